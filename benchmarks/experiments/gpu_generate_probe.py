"""Where does the decode engine stall at a sparse level on the GPU? (benchmarks/README.md: the first H200
run of `e2e_decode.py generate` never finished a sparse-level timing within 5 minutes.)

Runs the engine behind `model.generate()` at one sparse level on the Llama-3-8B shapes (fewer layers, so
every variant compiles quickly) three ways -- eager, compiled without a CUDA graph, compiled and replayed
as a CUDA graph -- timing every step with a device sync, then `model.generate()` itself. Python stacks of
all threads are dumped every 60 s, so a stall shows where it is.

    TORCH_LOGS=recompiles,graph_breaks python benchmarks/experiments/gpu_generate_probe.py --layers 8
"""

import argparse
import faulthandler
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
    args = parser.parse_args()
    faulthandler.dump_traceback_later(60, repeat=True, file=sys.stderr)
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from e2e_decode import synthetic_runtime
    from winaconv_runtime.generation import DecodeEngine, DecodeSettings

    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.layers}, dtype="bfloat16"))
    base = base.to(torch.bfloat16).eval()
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
    print("--- model.generate()", flush=True)
    for run in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        print(f"generate run {run}: {time.perf_counter() - start:.2f} s, first tokens {out[0, 128:128 + args.steps + 1].tolist()}", flush=True)
    print("same tokens in all variants:", len({tuple(t) for t in tokens.values()}) == 1, flush=True)
    faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    main()
