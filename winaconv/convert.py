"""The conversion pipeline: load, transform, calibrate, allocate, write."""

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from winaconv_runtime.architectures import PROJECTIONS, family_for_model_type, parameter_shares
from winaconv_runtime.checkpoint_format import store_level

from . import sources
from .calibrate import ALLOCATION_HEADROOM, MAX_LAYER_SPARSITY, CalibrationSettings, calibrate_layers, layer_targets
from .calibration_data import load_calibration_text, token_sequences
from .checkpoint import atomic_folder, check_output_dir, is_winaconv_checkpoint, parse_shard_size, write_checkpoint
from .errors import WinaconvError
from .options import ConvertOptions
from .runtime_model import to_runtime_model, winaconv_section
from .sensitivity import output_divergences
from .transform import apply_transform, check_transform, default_transform

# The reference code scores only these two with column norms; the paper scores all seven.
REFERENCE_NORM_SCORED = ("k", "gate")


@dataclass
class ConvertReport:
    out: Path
    levels: dict[float, list[dict[str, float]]]  # level -> per-layer projection sparsities
    layer_seconds: list[float]
    seconds: float = 0.0
    peak_host_bytes: int = 0
    peak_gpu_bytes: int | None = None


def norm_scored_projections(method: str, scoring: str) -> tuple[str, ...]:
    if method == "teal":
        return ()
    return REFERENCE_NORM_SCORED if scoring == "reference" else PROJECTIONS


def refuse_checkpoint_source(name) -> None:
    raise WinaconvError(f"{name} is already a winaconv checkpoint; convert its base model instead")


def validate(options: ConvertOptions, source_folder: Path | None = None) -> list[float]:
    """Every check that needs no model: run before anything slow."""
    given = [float(s) for s in options.sparsity_levels]
    bad = [s for s in given if not 0.0 <= s < 1.0]
    if bad:
        raise WinaconvError(f"sparsity levels must lie in [0, 1); got {', '.join(f'{s:g}' for s in bad)}")
    levels = sorted(set(given) - {0.0})
    if not levels:
        raise WinaconvError("--sparsity-levels needs at least one level above 0 (0, the dense model, is always "
                            "available); e.g. 0.25,0.5")
    if options.default_sparsity is None:
        options.default_sparsity = max(levels) if 0.5 > max(levels) else min(levels, key=lambda s: abs(s - 0.5))
    if options.default_sparsity not in [0.0, *levels]:
        raise WinaconvError(f"--default-sparsity {options.default_sparsity:g} is not one of the levels "
                            f"{', '.join(f'{s:g}' for s in levels)} (or 0)")
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
    return levels


def convert(options: ConvertOptions, progress=None, say=print) -> ConvertReport:
    started = time.perf_counter()
    source = sources.resolve_source(options.model, options.revision)
    local = Path(source.location) if Path(source.location).is_dir() else None
    default_chosen = options.default_sparsity is None
    levels = validate(options, local)
    device = sources.resolve_device(options.device)
    sources.check_local_folder(source)
    config = sources.load_config(source)
    if isinstance(getattr(config, "winaconv", None), dict):  # a Hub id (local folders are refused in validate)
        refuse_checkpoint_source(source.model_id)
    transform = options.transform or default_transform(family_for_model_type(config.model_type))
    check_transform(family_for_model_type(config.model_type), transform)
    calibration = load_calibration_text(options.calib_file, options.calib_dataset)
    if calibration.note:
        say(calibration.note)
    if default_chosen and options.default_sparsity != 0.5:
        say(f"default sparsity: {options.default_sparsity:g} (the level loaded without sparsity=; "
            "--default-sparsity picks another)")
    save_dtype = sources.source_dtype(config, options.dtype)
    work_dtype = torch.float32 if device == "cpu" else save_dtype

    say(f"loading {source.model_id}")
    tokenizer = sources.load_tokenizer(source)
    base = sources.load_model(source, torch.float32)
    norm_scored = norm_scored_projections(options.method, options.scoring)
    section = winaconv_section(options.method, transform, norm_scored)
    model, family = to_runtime_model(base, section)
    del base

    input_ids = token_sequences(tokenizer, calibration.texts, options.seq_len, options.calib_tokens, options.seed)
    say(f"transform: {transform}")
    apply_transform(model, family, transform, device=device, calibration_ids=input_ids)
    model.to(work_dtype)

    settings = CalibrationSettings(
        norm_scored=norm_scored,
        max_sparsity=max(levels),
        greedy_sequences=max(1, options.greedy_tokens // options.seq_len),
        greedy_step=options.greedy_step,
        seed=options.seed,
        device=device,
        path_limit=(min(max(levels) + ALLOCATION_HEADROOM, MAX_LAYER_SPARSITY)
                    if options.layer_allocation != "uniform" else None),
        # the sparse upstream is the default level's: one stream of activations serves every level
        upstream_level=float(options.default_sparsity) if options.upstream == "sparse" else None,
    )
    shares = parameter_shares(model.config)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    layers = calibrate_layers(model, family, input_ids, shares, settings, progress)
    divergences = None
    if options.layer_allocation == "divergence":
        say("measuring each layer's effect on the output")
        points = sorted({*levels, settings.path_end})
        divergences = points, output_divergences(model, family, layers, input_ids[:settings.greedy_sequences],
                                                 shares, points, settings)

    sparsities = {}
    for level in levels:
        targets = layer_targets(layers, level, shares, options.layer_allocation, divergences)
        per_layer = [layer.sparsities_at(target, shares) for layer, target in zip(layers, targets)]
        thresholds = [layer.thresholds_for(s) for layer, s in zip(layers, per_layer)]
        store_level(model.config.winaconv, level, [[t[p] for p in PROJECTIONS] for t in thresholds],
                    [[s[p] for p in PROJECTIONS] for s in per_layer])
        sparsities[level] = per_layer
    model.config.winaconv.update(
        default_sparsity=float(options.default_sparsity),
        calibration={
            "source": calibration.source,
            "tokens": int(input_ids.numel()),
            "seq_len": options.seq_len,
            "greedy_tokens": settings.greedy_sequences * options.seq_len,
            "greedy_step": options.greedy_step,
            "layer_allocation": options.layer_allocation,
            "upstream": options.upstream,
            "seed": options.seed,
        },
        base_model={"id": source.model_id, "revision": source.revision},
    )
    model.to(save_dtype)
    model.config.dtype = save_dtype

    say(f"writing {options.out}")
    with atomic_folder(Path(options.out), options.overwrite, local) as staging:
        write_checkpoint(model, family, tokenizer, staging, options.max_shard_size)

    report = ConvertReport(
        out=Path(options.out),
        levels=sparsities,
        layer_seconds=[layer.seconds for layer in layers],
        seconds=time.perf_counter() - started,
        peak_host_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_gpu_bytes=torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
    )
    return report



