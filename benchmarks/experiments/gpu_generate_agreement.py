"""Do `model.generate()`'s greedy tokens on the GPU agree with transformers' own loop on the same model?

On the Llama-3-8B shapes with random weights (fewer layers) the next-token logits are nearly tied, so a
last-bit difference between two correct computations (a compiled step fuses differently from eager) can
change the argmax. This prints, per dtype and level, how many leading greedy tokens of 32 agree between:
  ours        model.generate() (compiled step, CUDA graph)
  ours eager  the same engine run eagerly (no compile, no graph)
  hf eager    transformers' GenerationMixin.generate on the same runtime model (dynamic cache)
and, as the yardstick, transformers' own compiled static-cache generate against its eager one on the
base model.

    python benchmarks/experiments/gpu_generate_agreement.py --layers 8 [--dtypes float64]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import LLAMA3_8B  # noqa: E402


def agree(a, b, prompt_length):
    return int((a[0, prompt_length:] == b[0, prompt_length:]).long().cumprod(0).sum())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="float64 rules out rounding: any disagreement is a bug")
    args = parser.parse_args()
    from transformers import GenerationConfig, GenerationMixin, LlamaConfig, LlamaForCausalLM

    from e2e_decode import synthetic_runtime
    from winaconv_runtime.generation import DecodeEngine, DecodeSettings

    n = args.new_tokens
    greedy = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
        torch.manual_seed(0)
        with torch.device("cuda"):
            base = LlamaForCausalLM(LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": args.layers}, dtype=dtype))
        base = base.to(dtype).eval()
        prompt = torch.randint(100, 40000, (1, 128), device="cuda")
        mask = torch.ones_like(prompt)
        with torch.no_grad():
            hf_eager = base.generate(prompt, attention_mask=mask, **greedy)
            hf_static = base.generate(prompt, attention_mask=mask, cache_implementation="static", **greedy)
        print(f"{dtype}: transformers static+compile vs eager, base model: {agree(hf_static, hf_eager, 128)} of {n}", flush=True)
        model = synthetic_runtime(base, "none", prompt, [0.5])
        for level in (0.0, 0.5):
            model.set_sparsity(level)
            ours = model.generate(prompt, attention_mask=mask, **greedy)
            reference = GenerationMixin.generate(model, prompt, attention_mask=mask, **greedy)
            settings = DecodeSettings(GenerationConfig(**greedy), 128, None)
            with torch.no_grad():
                eager = DecodeEngine(model, 1, 256, compile=False, cuda_graph=False).run(prompt, mask, settings)
            print(f"{dtype} level {level}: ours vs hf eager {agree(ours, reference, 128)}, ours eager vs hf eager "
                  f"{agree(eager, reference, 128)}, ours vs ours eager {agree(ours, eager, 128)} (of {n})", flush=True)
        del base, model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
