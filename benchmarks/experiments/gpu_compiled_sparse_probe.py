"""Which part of the compiled decode step makes it pick other tokens than the eager step at a sparse level?
(results/gpu_generate_agreement_h200*.txt: at level 0.5 the compiled step leaves the eager tokens after
1-5 tokens, in bfloat16, float32 and float64; the eager engine equals transformers' loop.)

Float32, Llama-3-8B shapes with fewer layers, level 0.5; leading greedy tokens (of 32) that equal the eager
engine's, for the compiled step (no CUDA graph) with: inductor (the default), the aot_eager backend (traced
and functionalised, no inductor), the eager backend (dynamo only), and inductor with every shared-input
group split into separate launches (no hand-off of q/k/v and gate/up outputs between modules).

    python benchmarks/experiments/gpu_compiled_sparse_probe.py --layers 8
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import LLAMA3_8B  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from e2e_decode import synthetic_runtime
    from winaconv_runtime.generation import DecodeEngine, DecodeSettings
    from winaconv_runtime.sparse_linear import SparseLinear

    torch.manual_seed(0)
    with torch.device("cuda"):
        base = LlamaForCausalLM(LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.layers}, dtype=torch.float32))
    prompt = torch.randint(100, 40000, (1, 128), device="cuda")
    mask = torch.ones_like(prompt)
    model = synthetic_runtime(base.eval(), "none", prompt, [0.5])
    model.set_sparsity(0.5)
    n = args.new_tokens
    settings = DecodeSettings(GenerationConfig(max_new_tokens=n, do_sample=False), 128, None)

    def tokens(backend=None):
        engine = DecodeEngine(model, 1, 256, compile=backend is not None, cuda_graph=False)
        if backend not in (None, "inductor"):
            engine._forward_fn = torch.compile(engine._forward, backend=backend, dynamic=False)
        with torch.no_grad():
            return engine.run(prompt, mask, settings)[0, 128:]

    def agree(a, b):
        return int((a == b).long().cumprod(0).sum())

    torch._dynamo.config.recompile_limit = 64
    eager = tokens()
    for backend in ("inductor", "aot_eager", "eager"):
        torch._dynamo.reset()
        print(f"compiled ({backend}) vs eager: {agree(tokens(backend), eager)} of {n}", flush=True)
    groups = {m.shared_input_group for m in model.modules() if isinstance(m, SparseLinear)} - {None}
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.shared_input_group = None  # each member launches the kernel on its own columns
    torch._dynamo.reset()
    separate_eager = tokens()
    print(f"separate launches ({len(groups)} groups split): eager vs grouped eager {agree(separate_eager, eager)}; "
          f"compiled (inductor) vs eager {agree(tokens('inductor'), separate_eager)} of {n}", flush=True)


if __name__ == "__main__":
    main()
