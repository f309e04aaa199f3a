"""Everything the command line prints: progress and notes on stderr, tables on stdout (so --json and
pipes get only results), all through one pair of rich consoles."""

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from winaconv_runtime.architectures import PROJECTIONS
from winaconv_runtime.checkpoint_format import level_key

from .errors import WinaconvError

err = Console(stderr=True)
out = Console()


def say(message: str) -> None:
    err.print(f"[bold]winaconv[/]: {message}", soft_wrap=True)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=False,
    )


def _projection_table(title: str, extra_column: str | None = None) -> Table:
    """A table with a row per layer and a column per projection (rows added by the caller)."""
    table = Table(title=title)
    table.add_column("layer", justify="right")
    for p in PROJECTIONS:
        table.add_column(p, justify="right")
    if extra_column:
        table.add_column(extra_column, justify="right")
    return table


def print_summary(report, default_sparsity: float) -> None:
    """convert: per-projection sparsities of the default level, time and peak memory."""
    level = default_sparsity if default_sparsity in report.levels else max(report.levels)
    table = _projection_table(f"per-projection sparsity at level {level:g}", "seconds")
    for idx, (row, seconds) in enumerate(zip(report.levels[level], report.layer_seconds)):
        table.add_row(str(idx), *(f"{row[p]:.2f}" for p in PROJECTIONS), f"{seconds:.1f}")
    err.print(table)
    gpu = f", peak GPU memory {report.peak_gpu_bytes / 2**30:.2f} GiB" if report.peak_gpu_bytes is not None else ""
    resumed = f" (resumed after layer {report.resumed_layers})" if report.resumed_layers else ""
    err.print(f"wrote {report.out} in {report.seconds:.0f} s{resumed}, peak host memory "
              f"{report.peak_host_bytes / 2**30:.2f} GiB{gpu}")
    if report.host_bound_bytes is not None:
        grown = (report.peak_host_bytes - report.start_host_bytes) / 2**30
        err.print(f"host memory grew by {grown:.2f} GiB once the source was opened; a streamed conversion should stay under "
                  f"{report.host_bound_bytes / 2**30:.2f} GiB (embeddings + lm_head in float32, 3 decoder layers in "
                  "float64, 3x the calibration activations, the score samples, the largest tensor read twice in float32)")
        over = report.host_growth_over_bound()
        if over is not None:
            err.print(f"warning: that is {over / 2**30:.2f} GiB more than the bound and the process's own allowance "
                      "(allocator, threads): a larger model may not fit where the bound says it would",
                      style="bold yellow", soft_wrap=True)


def print_eval(report) -> None:
    label = report.method if report.method == "dense" else f"{report.method}, transform {report.transform}, scoring {report.scoring}"
    table = Table(title=f"perplexity on {report.text} ({label}; window {report.window}, stride {report.stride})")
    for name in ("sparsity", "perplexity", "tokens", "seconds"):
        table.add_column(name, justify="right")
    for r in report.results:
        table.add_row(f"{r.sparsity:g}", f"{r.perplexity:.3f}", str(r.tokens), f"{r.seconds:.1f}")
    out.print(table)
    error = report.tasks.get("error") if report.tasks else None
    for level, tasks in (report.tasks.get("results", {}) if report.tasks else {}).items():
        for task, metrics in tasks.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "stderr" not in k)
            out.print(f"sparsity {level}: {task}: {shown}")
    if error:
        click.echo(error, err=True)


def _level_order(key: str) -> float:
    try:
        return float(key)
    except ValueError:
        return -1.0


def print_inspection(inspection, sparsity, show_thresholds) -> None:
    from .checkpoint.inspection import tensor_parallel_support

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
        ("tensor parallel", tensor_parallel_support(config)),
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
    fmt = (lambda v: f"{v:.4g}") if show_thresholds else (lambda v: f"{v:.3f}")
    table = _projection_table(f"{table_name} at level {key}")
    for idx, row in enumerate(rows):
        table.add_row(str(idx), *(fmt(v) if isinstance(v, (int, float)) else repr(v) for v in row))
    if not show_thresholds and rows:
        try:
            table.add_row("mean", *(f"{sum(r[i] for r in rows) / len(rows):.3f}" for i in range(len(PROJECTIONS))))
        except TypeError:
            pass
    out.print(table)


def print_bench(report: dict) -> None:
    table = Table(title=f"decode ms/token through generate(), {report['device']}, batch {report['batch']}")
    for column in ("path", "ms/token", "vs level 0", "vs transformers dense"):
        table.add_column(column, justify="right")
    base = report["transformers_dense_ms"]
    table.add_row("transformers dense", f"{base:.2f}", "", "1.00x")
    level0 = report["speed"].get("0")
    for level, ms in report["speed"].items():
        table.add_row(f"winaconv {level}", f"{ms:.2f}", f"{level0 / ms:.2f}x" if level0 else "", f"{base / ms:.2f}x")
    out.print(table)
