"""The checks a conversion makes of its options and its source before any slow step."""

from pathlib import Path
from typing import NamedTuple

from ..checkpoint.folder import check_no_live_conversion, check_output_dir, is_winaconv_checkpoint
from ..errors import WinaconvError
from ..options import ConvertOptions
from .write import parse_shard_size


def refuse_checkpoint_source(name) -> None:
    raise WinaconvError(f"{name} is already a winaconv checkpoint; convert its base model instead")


class Levels(NamedTuple):
    """The levels a conversion stores (0, dense, is always available besides) and the one loaded by default."""
    levels: list[float]
    default_sparsity: float


def validate(options: ConvertOptions, source_folder: Path | None = None) -> Levels:
    """Every check that needs no model, run before anything slow; returns the levels it settled."""
    given = [float(s) for s in options.sparsity_levels]
    bad = [s for s in given if not 0.0 <= s < 1.0]
    if bad:
        raise WinaconvError(f"sparsity levels must lie in [0, 1); got {', '.join(f'{s:g}' for s in bad)}")
    levels = sorted(set(given) - {0.0})
    if not levels:
        raise WinaconvError("--sparsity-levels needs at least one level above 0 (0, the dense model, is always "
                            "available); e.g. 0.25,0.5")
    default = options.default_sparsity
    if default is None:  # 0.5 where stored, else the stored level nearest to it
        default = max(levels) if 0.5 > max(levels) else min(levels, key=lambda s: abs(s - 0.5))
    if default not in [0.0, *levels]:
        raise WinaconvError(f"--default-sparsity {default:g} is not one of the levels "
                            f"{', '.join(f'{s:g}' for s in levels)} (or 0)")
    if options.calib_file and options.calib_dataset:
        raise WinaconvError("--calib-file and --calib-dataset both given: calibration uses one source; drop one")
    if options.seq_len < 8 or options.calib_tokens < options.seq_len:
        raise WinaconvError("--calib-tokens must be at least --seq-len, and --seq-len at least 8")
    if not 0.0 < options.greedy_step < 1.0:
        raise WinaconvError(f"--greedy-step must lie in (0, 1); got {options.greedy_step:g}")
    if options.greedy_tokens < 1:
        raise WinaconvError(f"--greedy-tokens must be at least 1; got {options.greedy_tokens}")
    parse_shard_size(options.max_shard_size)
    if source_folder is not None and is_winaconv_checkpoint(source_folder):  # exact ones included
        refuse_checkpoint_source(source_folder)
    check_output_dir(Path(options.out), options.overwrite, source_folder)
    check_no_live_conversion(Path(options.out))
    return Levels(levels, float(default))


def check_context(config, seq_len: int) -> None:
    """Calibration sequences longer than the model's context would calibrate positions it never runs."""
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and seq_len > context:
        raise WinaconvError(f"--seq-len {seq_len} is longer than the model's context of {context} positions")


def calibration_note(tokens: int, options: ConvertOptions) -> str | None:
    """What to say when the calibration text holds fewer tokens than --calib-tokens asks for."""
    if tokens >= options.calib_tokens:
        return None
    return (f"calibrating on {tokens} tokens, not the {options.calib_tokens} --calib-tokens asks for: the "
            f"calibration text holds only {tokens // options.seq_len} sequences of {options.seq_len} tokens")
