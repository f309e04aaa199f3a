"""The `winaconv` command line."""

import contextlib
import functools
import logging
import os
import signal
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from winaconv_runtime.architectures import PROJECTIONS
from winaconv_runtime.checkpoint_format import CheckpointFormatError

from . import __version__
from .errors import WinaconvError

console = Console(stderr=True)


def one_line_errors(command):
    """Turn expected failures into a one-line `Error: ...` (exit status 1), with no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (WinaconvError, CheckpointFormatError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def parse_levels(ctx, param, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers such as 0.25,0.5; got {value!r}") from None


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=False,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="winaconv")
def main():
    """Convert language models to WINA activation sparsity; the checkpoints decode faster
    through winaconv's runtime (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@main.command()
@click.argument("model")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Folder to write the checkpoint to.")
@click.option("--method", type=click.Choice(["wina", "teal"]), default="wina", show_default=True,
              help="wina scores |x_i|*||W[:,i]||, teal scores |x_i|.")
@click.option("--scoring", type=click.Choice(["paper", "reference"]), default="paper", show_default=True,
              help="wina only: column norms on all seven projections (paper) or on k and gate only (reference code).")
@click.option("--transform", type=click.Choice(["exact", "global", "pca", "none"]), default=None,
              help="Rotation folded into the weights: exact (per block, WINA's), global (one, from the weights), "
                   "pca (one, from the calibration activations) or none. Default: pca; none for Gemma 2/3.")
@click.option("--sparsity-levels", default="0.25,0.4,0.5,0.65", show_default=True, callback=parse_levels,
              help="Model-level sparsities stored in the checkpoint, each in [0, 1).")
@click.option("--default-sparsity", type=float, default=None,
              help="Level used when loading without sparsity= (default: 0.5 if stored, else the stored level nearest it).")
@click.option("--calib-file", type=click.Path(), help="Calibration text: .txt, or .jsonl with a 'text' field.")
@click.option("--calib-dataset", help="Hugging Face dataset for calibration (needs the 'datasets' package and network).")
@click.option("--calib-tokens", type=int, default=16384, show_default=True, help="Calibration tokens for score statistics.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Calibration sequence length.")
@click.option("--greedy-tokens", type=int, default=2048, show_default=True, help="Tokens the greedy allocation evaluates on.")
@click.option("--greedy-step", type=float, default=0.025, show_default=True, help="Base step of the greedy allocation.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="dtype of the written weights (auto: the model's own).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--revision", help="Hub revision of MODEL.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a previous winaconv checkpoint at --out (nothing else is ever replaced).")
@click.option("--push-to", metavar="REPO_ID", help="After converting, push the checkpoint to this Hub repo (see `winaconv push`).")
@click.option("--push-private", is_flag=True, help="With --push-to: create the repo private.")
@one_line_errors
def convert(model, out, push_to=None, push_private=False, **options):
    """Convert MODEL (a Hub id, a transformers folder or a .gguf file) into a sparse checkpoint."""
    from .convert import ConvertOptions, convert as run_conversion

    if push_to:  # fail before a long conversion, not after it
        from .hub import check_repo_id, resolve_token

        check_repo_id(push_to)
        resolve_token(None)
    opts = ConvertOptions(model=model, out=out, **options)
    with terminate_like_interrupt(), progress_bar() as progress:
        report = run_conversion(opts, progress=progress, say=lambda m: console.print(f"[bold]winaconv[/]: {m}"))
    print_summary(report, opts.default_sparsity)
    if push_to:
        push_checkpoint(report.out, push_to, private=push_private)


@contextlib.contextmanager
def terminate_like_interrupt():
    """SIGTERM (kill, timeout, job schedulers) unwinds like Ctrl-C, so the staging folder is removed."""
    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def print_summary(report, default_sparsity: float) -> None:
    level = default_sparsity if default_sparsity in report.levels else max(report.levels)
    table = Table(title=f"per-projection sparsity at level {level:g}")
    table.add_column("layer", justify="right")
    for p in PROJECTIONS:
        table.add_column(p, justify="right")
    table.add_column("seconds", justify="right")
    for idx, (row, seconds) in enumerate(zip(report.levels[level], report.layer_seconds)):
        table.add_row(str(idx), *(f"{row[p]:.2f}" for p in PROJECTIONS), f"{seconds:.1f}")
    console.print(table)
    gpu = f", peak GPU memory {report.peak_gpu_bytes / 2**30:.2f} GiB" if report.peak_gpu_bytes is not None else ""
    console.print(
        f"wrote {report.out} in {report.seconds:.0f} s, peak host memory {report.peak_host_bytes / 2**30:.2f} GiB{gpu}"
    )


def parse_names(ctx, param, value):
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


@main.command("eval")
@click.argument("model")
@click.option("--text-file", type=click.Path(),
              help="Held-out text (.txt, or .jsonl with a 'text' field). Default: the built-in held-out news text "
                   "(needs gensim's wheel: pip install --no-deps gensim).")
@click.option("--sparsity", "levels", callback=lambda ctx, param, v: parse_levels(ctx, param, v) if v else None,
              help="Comma-separated levels to evaluate (default: every stored level, 0 = dense, included).")
@click.option("--window", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--stride", type=int, default=None,
              help="Tokens between window starts; default: --window (no overlap). Less: overlapping windows, "
                   "each token scored once.")
@click.option("--max-tokens", type=int, help="Use at most this many tokens of the text.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Windows per forward pass.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="auto: float32 on CPU, the checkpoint's own dtype on GPU.")
@click.option("--tasks", callback=parse_names, default="",
              help="Zero-shot lm-evaluation-harness tasks, e.g. piqa,arc_easy (needs lm_eval and network).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@one_line_errors
def eval_command(model, text_file, levels, window, stride, max_tokens, batch_size, device, dtype, tasks, as_json):
    """Perplexity of MODEL (a winaconv checkpoint, or a plain model evaluated dense) on held-out text,
    through the runtime's sparse path at each sparsity level."""
    from transformers.utils import logging as transformers_logging

    from .evaluate import EvalOptions, evaluate

    transformers_logging.disable_progress_bar()  # "Loading weights" bars: the command shows its own progress
    options = EvalOptions(model=model, text_file=text_file, levels=levels or None, window=window, stride=stride,
                          max_tokens=max_tokens, batch_size=batch_size, device=device, dtype=dtype, tasks=tasks)
    say = (lambda m: None) if as_json else (lambda m: console.print(f"[bold]winaconv[/]: {m}"))
    if as_json:
        report = evaluate(options, say=say)
        click.echo(report.to_json())
        if report.tasks.get("error"):
            click.echo(report.tasks["error"], err=True)
        return
    with progress_bar() as progress:
        report = evaluate(options, progress=progress, say=say)
    print_eval(report)


def print_eval(report) -> None:
    label = report.method if report.method == "dense" else f"{report.method}, transform {report.transform}, scoring {report.scoring}"
    table = Table(title=f"perplexity on {report.text} ({label}; window {report.window}, stride {report.stride})")
    for name in ("sparsity", "perplexity", "tokens", "seconds"):
        table.add_column(name, justify="right")
    for r in report.results:
        table.add_row(f"{r.sparsity:g}", f"{r.perplexity:.3f}", str(r.tokens), f"{r.seconds:.1f}")
    Console().print(table)
    error = report.tasks.get("error") if report.tasks else None
    for level, tasks in (report.tasks.get("results", {}) if report.tasks else {}).items():
        for task, metrics in tasks.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "stderr" not in k)
            Console().print(f"sparsity {level}: {task}: {shown}")
    if error:
        click.echo(error, err=True)


def push_checkpoint(folder, repo_id, private=False, revision=None, token=None, base_model=None, write_card=True):
    from .hub import push

    url = push(folder, repo_id, private=private, revision=revision, token=token, base_model=base_model,
               write_card=write_card, say=lambda m: console.print(f"[bold]winaconv[/]: {m}", soft_wrap=True))
    console.print(f"pushed {folder} to {repo_id}: {url}", soft_wrap=True)


@main.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", help="Branch to push to (created from main if missing). Default: main.")
@click.option("--token", help="Hugging Face token (default: HF_TOKEN, else the token `hf auth login` saved).")
@click.option("--base-model", help="Hub id of the base model for the card, when the checkpoint records a local path.")
@click.option("--no-card", is_flag=True, help="Do not write README.md (the model card) before uploading.")
@one_line_errors
def push_command(folder, repo_id, private, revision, token, base_model, no_card):
    """Upload the checkpoint FOLDER to the Hub repo REPO_ID, with a model card, creating the repo if needed.
    The checkpoint is validated first (as `winaconv inspect` does); a broken one is not pushed."""
    push_checkpoint(folder, repo_id, private=private, revision=revision, token=token, base_model=base_model,
                    write_card=not no_card)


@main.command("inspect")
@click.argument("checkpoint")
@click.option("--sparsity", type=float, help="Level whose per-layer table is shown (default: the checkpoint's default).")
@click.option("--thresholds", is_flag=True, help="Show the thresholds instead of the sparsities in the table.")
@click.option("--revision", help="Hub revision, when CHECKPOINT is a repo id.")
@click.option("--token", help="Hugging Face token for a private repo (default: HF_TOKEN).")
@one_line_errors
def inspect_command(checkpoint, sparsity, thresholds, revision, token):
    """Show what CHECKPOINT (a folder or a Hub repo id) is and check that it is whole: config, sparsity tables,
    runtime files, every tensor and its shape (from the safetensors headers; no weights are loaded).
    Exit status 1 with one line per problem when it is broken."""
    from .inspect_checkpoint import inspect_checkpoint

    inspection = inspect_checkpoint(checkpoint, revision=revision, token=token)
    print_inspection(inspection, sparsity, thresholds)
    for problem in inspection.problems:
        click.echo(f"problem: {problem}", err=True)
    if inspection.problems:
        click.get_current_context().exit(1)


def _level_order(key: str) -> float:
    try:
        return float(key)
    except ValueError:
        return -1.0


def print_inspection(inspection, sparsity, show_thresholds) -> None:
    from winaconv_runtime.checkpoint_format import level_key

    out = Console()
    section, config = inspection.section, inspection.config
    if section is None:
        out.print(f"{inspection.name}: not a readable winaconv checkpoint")
        return
    base = section.get("base_model") or {}
    calibration = section.get("calibration") or {}
    levels = section.get("levels") if isinstance(section.get("levels"), dict) else {}
    default = section.get("default_sparsity")
    out.print(f"[bold]{inspection.name}[/]")
    for label, value in (
        ("format version", section.get("format_version")),
        ("base model", f"{base.get('id')}" + (f" @ {base.get('revision')}" if base.get("revision") else "")),
        ("architecture", f"{config.get('model_type')}, {config.get('num_hidden_layers')} layers, hidden {config.get('hidden_size')}"),
        ("method", f"{section.get('method')} (norm-scored: {', '.join(section.get('norm_scored') or []) or 'none'})"),
        ("transform", section.get("transform")),
        ("levels", ", ".join(sorted(levels, key=_level_order)) + f" (default {default})"),
        ("calibration", f"{calibration.get('source')}, {calibration.get('tokens')} tokens, seq_len {calibration.get('seq_len')}"),
        ("weights", f"{len(inspection.tensors)} tensors in {len(inspection.weight_files)} file(s), "
                    f"{inspection.total_bytes() / 2**20:.1f} MiB"),
        ("winaconv version", section.get("winaconv_version")),
    ):
        out.print(f"  {label:17} {value}")

    level = default if sparsity is None else sparsity
    try:
        key = level_key(float(level))
    except (TypeError, ValueError):
        return
    if key not in levels:
        if sparsity is not None and float(sparsity) != 0:
            raise WinaconvError(f"sparsity {sparsity:g} is not stored; stored: {', '.join(sorted(levels)) or 'none'}")
        out.print(f"level {key}: the dense model (no per-layer table)")
        return
    table_name = "thresholds" if show_thresholds else "sparsities"
    rows = levels[key].get(table_name) if isinstance(levels[key], dict) else None
    if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != len(PROJECTIONS) for r in rows):
        return  # reported as a problem
    table = Table(title=f"{table_name} at level {key}")
    table.add_column("layer", justify="right")
    for p in PROJECTIONS:
        table.add_column(p, justify="right")
    fmt = (lambda v: f"{v:.4g}") if show_thresholds else (lambda v: f"{v:.3f}")
    for idx, row in enumerate(rows):
        table.add_row(str(idx), *(fmt(v) if isinstance(v, (int, float)) else repr(v) for v in row))
    if not show_thresholds and rows:
        try:
            table.add_row("mean", *(f"{sum(r[i] for r in rows) / len(rows):.3f}" for i in range(len(PROJECTIONS))))
        except TypeError:
            pass
    out.print(table)


from .generate_cli import register as _register_generate_commands  # noqa: E402

_register_generate_commands(main, one_line_errors)

if __name__ == "__main__":
    main()
