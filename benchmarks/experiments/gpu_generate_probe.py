"""Where does the decode engine stall at a sparse level on the GPU? (benchmarks/README.md: the first H200
run of `e2e_decode.py generate` never finished a sparse-level timing within 5 minutes.)

Runs the engine behind `model.generate()` at one sparse level on the Llama-3-8B shapes (fewer layers, so
every variant compiles quickly) three ways -- eager, compiled without a CUDA graph, compiled and replayed
as a CUDA graph -- timing every step with a device sync (the first compiled step includes compiling), then
`model.generate()` itself, greedy and sampling. --dtype float32 checks that the compiled and eager loops
pick the same tokens (in bfloat16 a last-bit difference flips threshold decisions on a random model).

    TORCH_LOGS=recompiles python benchmarks/experiments/gpu_generate_probe.py --layers 8 [--dtype float32]

Outputs: results/gpu_generate_probe_h200.log (first run: the whole step, model included, compiled per
sampling setting, the kernels a triton_op: compiling took 29 s for 8 layers and the step was compiled again
for generate()'s EOS setting); results/gpu_generate_probe_h200_custom_op.log (after the fix).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import LLAMA3_8B  # noqa: E402


def timed_steps(engine, prompt, settings, steps):
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.start(prompt, torch.ones_like(prompt), settings)
    torch.cuda.synchronize()
    times = [time.perf_counter() - start]
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--level", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from e2e_decode import synthetic_runtime
    from winaconv_runtime.generation import DecodeEngine, DecodeSettings

    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.layers}, dtype=args.dtype))
    base = base.to(getattr(torch, args.dtype)).eval()
    prompt = torch.randint(100, 40000, (1, 128), device="cuda")
    model = synthetic_runtime(base, "none", prompt, [args.level])
    model.set_sparsity(args.level)
    settings = DecodeSettings(GenerationConfig(max_new_tokens=args.steps + 1, do_sample=False), 128, None)
    tokens = {}
    for name, compile, graph in (("eager", False, False), ("compiled", True, False), ("graph", True, True)):
        print(f"--- {name} (level {args.level}, {args.layers} layers)", flush=True)
        engine = DecodeEngine(model, 1, 256, compile=compile, cuda_graph=graph)
        with torch.no_grad():
            for run in range(2):
                times = timed_steps(engine, prompt, settings, args.steps)
                print(f"{name} run {run}: prefill {times[0] * 1e3:.1f} ms, steps (ms) "
                      + " ".join(f"{t * 1e3:.1f}" for t in times[1:]), flush=True)
        tokens[name] = engine.tokens[0, 128:128 + args.steps + 1].tolist()
        print(f"{name} tokens {tokens[name]}", flush=True)
    for name, options in (("greedy", dict(do_sample=False)), ("sampling", dict(do_sample=True, temperature=0.7, top_p=0.9)),
                          ("sampling, temperature 0.8", dict(do_sample=True, temperature=0.8, top_p=0.9))):
        print(f"--- model.generate() {name}", flush=True)
        for run in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, pad_token_id=0, **options)
            torch.cuda.synchronize()
            print(f"generate {name} run {run}: {time.perf_counter() - start:.2f} s, first tokens "
                  f"{out[0, 128:128 + args.steps + 1].tolist()}", flush=True)
    print("same tokens in all variants:", len({tuple(t) for t in tokens.values()}) == 1, flush=True)


if __name__ == "__main__":
    main()
