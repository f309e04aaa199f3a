"""The `winaconv` command line."""

import functools
import logging
import os
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
@click.option("--transform", type=click.Choice(["exact", "global", "none"]), default="global", show_default=True,
              help="Orthogonalizing transform folded into the weights.")
@click.option("--sparsity-levels", default="0.25,0.4,0.5,0.65", show_default=True, callback=parse_levels,
              help="Model-level sparsities stored in the checkpoint, each in [0, 1).")
@click.option("--default-sparsity", type=float, default=0.5, show_default=True, help="Level used when loading without sparsity=.")
@click.option("--calib-file", type=click.Path(), help="Calibration text: .txt, or .jsonl with a 'text' field.")
@click.option("--calib-dataset", help="Hugging Face dataset for calibration (needs the 'datasets' package and network).")
@click.option("--calib-tokens", type=int, default=16384, show_default=True, help="Calibration tokens for score statistics.")
@click.option("--seq-len", type=int, default=512, show_default=True, help="Calibration sequence length.")
@click.option("--greedy-tokens", type=int, default=4096, show_default=True, help="Tokens the greedy allocation evaluates on.")
@click.option("--greedy-step", type=float, default=0.025, show_default=True, help="Base step of the greedy allocation.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True,
              help="dtype of the written weights (auto: the model's own).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--revision", help="Hub revision of MODEL.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out folder.")
@one_line_errors
def convert(model, out, **options):
    """Convert MODEL (a Hub id, a transformers folder or a .gguf file) into a sparse checkpoint."""
    from .convert import ConvertOptions, convert as run_conversion

    opts = ConvertOptions(model=model, out=out, **options)
    with progress_bar() as progress:
        report = run_conversion(opts, progress=progress, say=lambda m: console.print(f"[bold]winaconv[/]: {m}"))
    print_summary(report, opts.default_sparsity)


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


if __name__ == "__main__":
    main()
