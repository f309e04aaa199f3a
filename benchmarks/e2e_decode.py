"""End-to-end decode speed on the GPU: Llama-3-8B shapes, random bf16 weights, converted by winaconv.

Stages (run separately so each fits one device call; the work folder persists while the machine is warm):
  python benchmarks/e2e_decode.py make     --work /tmp/e2e            # random Llama-3-8B folder
  python benchmarks/e2e_decode.py convert  --work /tmp/e2e --transform global [--fast]
  python benchmarks/e2e_decode.py decode   --work /tmp/e2e --out results.json

Decode time per token = (time of generating N+1 tokens - time of generating 1) / N, static cache
(transformers compiles the decode step itself), batch 1, 128-token prompt, N = 256, median of 3.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent / "assets"  # SmolLM2's tokenizer: token ids only matter here
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
)
LEVELS = (0.0, 0.25, 0.4, 0.5, 0.65)


def make(work: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = work / "llama3-8b-random"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, dtype="bfloat16")).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.8, 1.2)  # non-trivial norms, so folding them is real work
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS).save_pretrained(folder)
    print(f"made {folder}")


def convert(work: Path, transform: str, fast: bool) -> None:
    out = work / f"ckpt-{transform}"
    command = [sys.executable, "-m", "winaconv.cli", "convert", str(work / "llama3-8b-random"), "--out", str(out), "--transform", transform,
               "--device", "cuda", "--dtype", "bfloat16", "--overwrite", "--calib-file", str(work / "calib.txt")]
    if fast:
        command += ["--calib-tokens", "4096", "--greedy-tokens", "1024"]
    (work / "calib.txt").write_text(_calibration_text())
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(result.stderr[-3000:])
    if result.returncode:
        sys.exit(result.returncode)
    record = {"transform": transform, "fast": fast, "command": " ".join(command), "wall_seconds": seconds,
              "summary": [line for line in result.stderr.splitlines() if line.startswith("wrote")]}
    (work / f"convert-{transform}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def _calibration_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _time_generate(model, prompt, new_tokens: int, repeats: int = 3) -> float:
    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, cache_implementation="static", pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(new_tokens + 1)  # compile and warm up
    full = statistics.median(run(new_tokens + 1) for _ in range(repeats))
    prefill = statistics.median(run(1) for _ in range(repeats))
    return (full - prefill) / new_tokens * 1000


def _time_eager(model, prompt, new_tokens: int) -> float:
    def run(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(8)
    return (run(new_tokens + 1) - run(1)) / new_tokens * 1000


def copy_bandwidth() -> float:
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1000)  # bytes read + written per second


def decode(work: Path, out: Path, new_tokens: int, transforms: list[str], baselines: bool, levels=LEVELS) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    prompt = torch.randint(100, 40000, (1, 128), device="cuda")
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update({
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": _version("triton"), "prompt_tokens": 128, "new_tokens": new_tokens, "batch": 1,
    })
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_TBps"] = bandwidth / 1e12
    if baselines:
        base = AutoModelForCausalLM.from_pretrained(work / "llama3-8b-random", dtype=torch.bfloat16, device_map="cuda")
        weight_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "embed_tokens" not in n)
        results["weight_read_floor_ms"] = weight_bytes / bandwidth * 1000
        results["transformers_eager_ms"] = _time_eager(base, prompt, 64)
        results["transformers_static_compile_ms"] = _time_generate(base, prompt, new_tokens)
        print(json.dumps(results), flush=True)
        del base
        torch.cuda.empty_cache()
    for transform in transforms:
        model = AutoModelForCausalLM.from_pretrained(work / f"ckpt-{transform}", trust_remote_code=True,
                                                     dtype=torch.bfloat16, device_map="cuda", sparsity=0)
        times = {}
        for level in levels:
            model.set_sparsity(level)
            times[f"{level:g}"] = _time_generate(model, prompt, new_tokens)
            print(transform, level, times[f"{level:g}"], flush=True)
        results[f"runtime_{transform}_ms"] = times
        del model
        torch.cuda.empty_cache()
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["make", "convert", "decode"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/e2e"))
    parser.add_argument("--transform", default="global")
    parser.add_argument("--transforms", default="global,exact")
    parser.add_argument("--fast", action="store_true", help="small calibration budget (speed runs only)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--levels", default=",".join(f"{x:g}" for x in LEVELS))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "e2e.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "make":
        make(args.work)
    elif args.stage == "convert":
        convert(args.work, args.transform, args.fast)
    else:
        transforms = [t for t in args.transforms.split(",") if t]
        levels = [float(x) for x in args.levels.split(",")]
        decode(args.work, args.out, args.new_tokens, transforms, not args.no_baselines, levels)


if __name__ == "__main__":
    main()
