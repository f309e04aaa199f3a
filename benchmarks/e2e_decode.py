"""End-to-end decode speed on the GPU: Llama-3-8B shapes, random bf16 weights, converted by winaconv.

Stages (run separately so each fits one device call; the work folder persists while the machine is warm):
  python benchmarks/e2e_decode.py make     --work /tmp/e2e            # random Llama-3-8B folder
  python benchmarks/e2e_decode.py convert  --work /tmp/e2e --transform global [--fast]
  python benchmarks/e2e_decode.py decode   --work /tmp/e2e --checkpoints global --out results.json
  python benchmarks/e2e_decode.py decode   --synthetic none,exact --out results.json   # no conversion
  python benchmarks/e2e_decode.py generate --out generate.json    # model.generate() greedy/sampling, batch 1 and 4
CPU smoke run (every stage, SMOKE_LLAMA in float32, seconds; tests/test_benchmarks.py): add --smoke.

Decode time per token = (time of generating N+1 tokens - time of generating 1) / N, batch 1,
128-token prompt, N = 256, median of 3: transformers' generate (eager; static cache with its
automatic compile) and the runtime's GreedyDecoder (static cache, compiled step, CUDA graph).
Each runtime level also records the realized sparsity of its decode inputs and a per-kernel-kind
GPU time profile of one compiled step.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import (LLAMA3_8B, SMOKE_LLAMA, copy_bandwidth, hf_generate, ms_per_token, profile_step, random_llama,
                    synthetic_runtime)
from winaconv.convert.calibration_data import builtin_texts

ASSETS = Path(__file__).resolve().parent / "assets"  # SmolLM2's tokenizer: token ids only matter here
LEVELS = (0.0, 0.25, 0.4, 0.5, 0.65)
# what --smoke changes: the device, the model's shapes and dtype (and the number of new tokens)
SETUP = {"device": "cuda", "shape": LLAMA3_8B, "dtype": torch.bfloat16}
SMOKE = {"device": "cpu", "shape": SMOKE_LLAMA, "dtype": torch.float32}


def make(work: Path) -> None:
    from transformers import AutoTokenizer

    folder = work / "llama3-8b-random"
    # non-trivial norms: folding them is real work
    random_llama(SETUP["shape"], SETUP["device"], norms=(0.8, 1.2), dtype=SETUP["dtype"]).save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS).save_pretrained(folder)
    print(f"made {folder}")


def convert(work: Path, transform: str, fast: bool) -> None:
    out = work / f"ckpt-{transform}"
    command = [sys.executable, "-m", "winaconv.cli", "convert", str(work / "llama3-8b-random"), "--out", str(out), "--transform", transform,
               "--device", SETUP["device"], "--dtype", str(SETUP["dtype"]).split(".")[1], "--overwrite", "--calib-file", str(work / "calib.txt")]
    if fast:
        command += ["--calib-tokens", "4096", "--greedy-tokens", "1024"]
    if SETUP["device"] == "cpu":  # the smoke run: a budget of a few hundred tokens
        command += ["--calib-tokens", "256", "--seq-len", "64", "--greedy-tokens", "64", "--greedy-step", "0.1",
                    "--sparsity-levels", "0.5"]
    (work / "calib.txt").write_text("\n\n".join(builtin_texts()))
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(result.stderr[-3000:])
    if result.returncode:
        sys.exit(result.returncode)
    import resource

    summary = [line for line in result.stderr.splitlines() if line.startswith(("wrote", "host memory grew"))]
    record = {"transform": transform, "fast": fast, "command": " ".join(command), "wall_seconds": seconds,
              "child_peak_rss_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, "summary": summary}
    (work / f"convert-{transform}.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def _time_generate(model, prompt, new_tokens: int) -> float:
    """transformers' static cache path (it compiles the decode step itself)."""
    return ms_per_token(hf_generate(model, prompt, cache_implementation="static"), new_tokens)[0]


def _time_eager(model, prompt, new_tokens: int) -> float:
    """transformers' eager path, dynamic cache: slow, so one timed call each."""
    return ms_per_token(hf_generate(model, prompt), new_tokens, repeats=1, warm_tokens=8)[0]


def _time_graph_decoder(decoder, prompt, new_tokens: int) -> tuple[float, torch.Tensor]:
    """ms per token of the runtime's CUDA-graph decoder, and the tokens of the last run."""
    return ms_per_token(lambda n: decoder.generate(prompt, n), new_tokens)


@torch.no_grad()
def realized_sparsity(model, prompt, steps: int = 16) -> float:
    """Fraction of projection weights whose input channel is dropped, over eager decode steps."""
    dropped, total, handles = [0.0], [0.0], []

    def hook(module, args):
        x = args[0].reshape(-1, module.in_features).float()
        if x.shape[0] != 1 or module.tau is None:
            return
        for size, tau in zip(module.segment_sizes, module.tau):
            dropped[0] += (x.abs() <= tau).float().mean().item() * size * module.in_features
            total[0] += size * module.in_features

    for module in model.modules():
        if hasattr(module, "tau") and hasattr(module, "segment_sizes"):  # a checkpoint's own SparseLinear class
            handles.append(module.register_forward_pre_hook(hook))
    try:
        out = model(prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    finally:
        for handle in handles:
            handle.remove()
    return dropped[0] / total[0] if total[0] else 0.0


def decode(work: Path, out: Path, new_tokens: int, checkpoints: list[str], synthetic: list[str], baselines: bool,
           levels=LEVELS, profile_levels=(0.0, 0.5)) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    from greedy_decoder import GreedyDecoder

    torch._dynamo.config.recompile_limit = 64  # one compiled step per model and level; never fall back to eager
    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    prompt = torch.randint(100, 40000, (1, 128), device=SETUP["device"])
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update({
        "gpu": _device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": _version("triton"), "prompt_tokens": 128, "new_tokens": new_tokens, "batch": 1,
        "command": " ".join(sys.argv),
    })
    bandwidth = copy_bandwidth() if SETUP["device"] == "cuda" else None
    results["copy_bandwidth_TBps"] = bandwidth and bandwidth / 1e12
    max_length = 128 + new_tokens + 8

    def save():
        out.write_text(json.dumps(results, indent=1))

    base = random_llama(SETUP["shape"], SETUP["device"], dtype=SETUP["dtype"]) if synthetic else None
    if baselines:
        if base is None:
            base = AutoModelForCausalLM.from_pretrained(work / "llama3-8b-random", dtype=SETUP["dtype"],
                                                        device_map=SETUP["device"]).eval()
        weight_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "embed_tokens" not in n)
        results["weight_read_floor_ms"] = bandwidth and weight_bytes / bandwidth * 1000
        results["transformers_eager_ms"] = _time_eager(base, prompt, 64)
        results["transformers_static_compile_ms"] = _time_generate(base, prompt, new_tokens)
        reference_tokens = hf_generate(base, prompt, cache_implementation="static")(64)
        decoder = GreedyDecoder(base, max_length)
        results["graph_decoder_plain_model_ms"], tokens = _time_graph_decoder(decoder, prompt, new_tokens)
        compared = min(64, tokens.shape[1] - 128)  # 64 unless the run is shorter (the smoke run)
        same = (tokens[0, 128:128 + compared] == reference_tokens[0, 128:128 + compared]).long().cumprod(0).sum().item()
        results["graph_decoder_plain_model_first_tokens_equal_to_generate"] = f"{same} of {compared}"
        try:
            results["graph_decoder_plain_model_profile"] = profile_step(decoder, prompt)
        except Exception as error:  # noqa: BLE001
            results["graph_decoder_plain_model_profile"] = f"failed: {error!r}"
        print(json.dumps(results), flush=True)
        save()
        del decoder
        if not synthetic:
            del base
            base = None
        _empty_cache()

    runs = [(f"ckpt-{name}", name, False) for name in checkpoints] + [(f"synthetic-{t}", t, True) for t in synthetic]
    for label, transform, is_synthetic in runs:
        if is_synthetic:
            model = synthetic_runtime(base, transform, prompt, levels)
        else:
            model = AutoModelForCausalLM.from_pretrained(work / label, trust_remote_code=True, dtype=SETUP["dtype"],
                                                         device_map=SETUP["device"], sparsity=0).eval()
        decoder = GreedyDecoder(model, max_length)
        record = {"graph_decoder_ms": {}, "realized_sparsity": {}, "profile": {}}
        for level in levels:
            model.set_sparsity(level)
            key = f"{level:g}"
            record["graph_decoder_ms"][key], _ = _time_graph_decoder(decoder, prompt, new_tokens)
            record["realized_sparsity"][key] = realized_sparsity(model, prompt)
            if level in profile_levels:
                try:  # a diagnostic: its failure must not cost the timings
                    record["profile"][key] = profile_step(decoder, prompt)
                except Exception as error:  # noqa: BLE001
                    record["profile"][key] = f"failed: {error!r}"
            print(label, key, record["graph_decoder_ms"][key], record["realized_sparsity"][key], flush=True)
            results[f"runtime_{label}"] = record
            save()
        del model, decoder
        _empty_cache()
    save()
    print(json.dumps(results, indent=1))


def generate_speeds(out: Path, new_tokens: int, levels, batches=(1, 4), baselines: bool = True,
                    profile_levels=(0.5,), sdpa_beside: bool = False) -> None:
    """model.generate() greedy and sampling (temperature 0.7, top-p 0.9) at each level and batch size, next to
    the GreedyDecoder front of the same engine and transformers' static cache + compile on the base model;
    sdpa_beside: the GreedyDecoder also with transformers' sdpa in place of the decode-attention kernel."""
    import transformers
    from transformers import GenerationMixin

    from greedy_decoder import GreedyDecoder
    from winaconv_runtime.decode_engine import cache_bucket

    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    results = {"gpu": _device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
               "triton": _version("triton"), "prompt_tokens": 128, "new_tokens": new_tokens, "command": " ".join(sys.argv),
               "sparse_kernel": os.environ.get("WINACONV_SPARSE_KERNEL", "list"),
               "sampling": "do_sample, temperature 0.7, top_p 0.9, top_k 50 (transformers' default)"}

    def save():
        out.write_text(json.dumps(results, indent=1))

    base = random_llama(SETUP["shape"], SETUP["device"], dtype=SETUP["dtype"])
    prompts = {b: torch.randint(100, 40000, (b, 128), device=SETUP["device"]) for b in batches}
    for b in batches if baselines else ():  # transformers' own generate on the base model: the dense reference
        results[f"transformers_static_compile_ms_b{b}"] = _time_generate(base, prompts[b], new_tokens)
        print(f"transformers static+compile batch {b}: {results[f'transformers_static_compile_ms_b{b}']:.2f}", flush=True)
        save()
    model = synthetic_runtime(base, "none", prompts[batches[0]][:1], levels)

    def ours(prompt, **options):
        return lambda n: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                        min_new_tokens=n, pad_token_id=0, **options)

    started = time.perf_counter()

    def stage(name, timed):
        """Run one timing and say when it starts and ends: a stage that never ends shows where it hangs."""
        print(f"[{time.perf_counter() - started:7.1f} s] {name} ...", flush=True)
        value = timed()
        print(f"[{time.perf_counter() - started:7.1f} s] {name}: {value:.3f} ms/token", flush=True)
        return value

    for b in batches:
        # the cache length generate() picks for these calls: same shapes, so one compiled step serves both
        length = cache_bucket(128 + new_tokens + 1, model.config.max_position_embeddings)
        decoder = GreedyDecoder(model, length, batch_size=b)
        sdpa_decoder = GreedyDecoder(model, length, batch_size=b, decode_attention=False) if sdpa_beside else None
        for level in levels:
            model.set_sparsity(level)
            key = f"b{b}_{level:g}"
            results[f"graph_decoder_ms_{key}"] = stage(
                f"{key} graph decoder", lambda: _time_graph_decoder(decoder, prompts[b], new_tokens)[0])
            results[f"attention_{key}"] = model.config._attn_implementation
            if sdpa_beside and model.config._attn_implementation != "sdpa":  # the same engine on plain sdpa
                chosen = model.config._attn_implementation
                model.set_attn_implementation("sdpa")
                results[f"graph_decoder_sdpa_ms_{key}"] = stage(
                    f"{key} graph decoder, sdpa attention", lambda: _time_graph_decoder(sdpa_decoder, prompts[b], new_tokens)[0])
                model.set_attn_implementation(chosen)
            if level in profile_levels:
                try:  # a diagnostic: its failure must not cost the timings
                    results[f"profile_{key}"] = profile_step(decoder, prompts[b])
                    print(key, "profile", json.dumps(results[f"profile_{key}"]["ms_per_step"]), flush=True)
                except Exception as error:  # noqa: BLE001
                    results[f"profile_{key}"] = f"failed: {error!r}"
            results[f"generate_greedy_ms_{key}"] = stage(
                f"{key} generate greedy", lambda: ms_per_token(ours(prompts[b], do_sample=False), new_tokens)[0])
            torch.manual_seed(0)
            results[f"generate_sample_ms_{key}"] = stage(f"{key} generate sampling", lambda: ms_per_token(
                ours(prompts[b], do_sample=True, temperature=0.7, top_p=0.9), new_tokens)[0])
            if level == 0.5:  # the greedy tokens of generate() and the transformers loop on the same model
                reference = GenerationMixin.generate(model, prompts[b][:1], attention_mask=torch.ones_like(prompts[b][:1]),
                                                     max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
                mine = ours(prompts[b][:1], do_sample=False)(32)
                same = (mine[0, 128:] == reference[0, 128:]).long().cumprod(0).sum().item()
                results[f"generate_first_tokens_equal_to_transformers_{key}"] = f"{same} of 32"
            print(key, {k: round(v, 3) for k, v in results.items() if k.endswith(key) and isinstance(v, float)}, flush=True)
            save()
        del decoder, sdpa_decoder
        _empty_cache()
    print(json.dumps(results, indent=1))


def _device_name() -> str:
    return torch.cuda.get_device_name() if SETUP["device"] == "cuda" else "cpu"


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["make", "convert", "decode", "generate"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/e2e"))
    parser.add_argument("--transform", default="global")
    parser.add_argument("--checkpoints", default="", help="converted checkpoints to time, by transform (decode)")
    parser.add_argument("--synthetic", default="", help="transforms to time with uniform levels and no conversion")
    parser.add_argument("--fast", action="store_true", help="small calibration budget (speed runs only)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--batches", default="1,4", help="batch sizes of the generate stage")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--levels", default=",".join(f"{x:g}" for x in LEVELS))
    parser.add_argument("--profile-levels", default="0,0.5", help="levels whose decode step is profiled")
    parser.add_argument("--sdpa-beside", action="store_true",
                        help="generate: also time the decoder with transformers' sdpa instead of the decode-attention kernel")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "e2e.json")
    parser.add_argument("--smoke", action="store_true",
                        help="SMOKE_LLAMA in float32 on the CPU, 4 new tokens: checks the stage runs (tests/test_benchmarks.py)")
    args = parser.parse_args()
    if args.smoke:
        SETUP.update(SMOKE)
        args.new_tokens = 4
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "make":
        make(args.work)
    elif args.stage == "convert":
        convert(args.work, args.transform, args.fast)
    elif args.stage == "generate":
        generate_speeds(args.out, args.new_tokens, [float(x) for x in args.levels.split(",")],
                        tuple(int(b) for b in args.batches.split(",")), not args.no_baselines,
                        [float(x) for x in args.profile_levels.split(",") if x], args.sdpa_beside)
    else:
        names = lambda text: [t for t in text.split(",") if t]  # noqa: E731
        levels = [float(x) for x in args.levels.split(",")]
        decode(args.work, args.out, args.new_tokens, names(args.checkpoints), names(args.synthetic),
               not args.no_baselines, levels, [float(x) for x in names(args.profile_levels)])


if __name__ == "__main__":
    main()
