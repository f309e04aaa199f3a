"""The conversion pipeline: load, transform, calibrate, allocate, write."""

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from winaconv_runtime.architectures import PROJECTIONS, family_for_model_type, parameter_shares, projection_sizes
from winaconv_runtime.checkpoint_format import CONVERSION_ID_KEY, SAFETENSORS_METADATA, store_level

from . import sources
from .calibrate import (
    ALLOCATION_HEADROOM, MAX_LAYER_SPARSITY, CalibrationSettings, calibrate_layers, layer_targets, residual_covariance,
)
from .calibration_data import load_calibration_text, token_sequences
from .checkpoint import (
    atomic_folder, check_no_live_conversion, check_output_dir, is_winaconv_checkpoint, parse_shard_size, saved_state_names,
    write_checkpoint_files,
)
from .errors import WinaconvError
from .onload import LAYER_PREFIX, StreamedLayers, end_names, layer_names, load_ends, needed_names, skeleton
from .options import ConvertOptions
from .resume import ResumeJournal, conversion_id, finished_layers, fingerprint
from .runtime_model import winaconv_section
from .sensitivity import output_divergences
from .shards import ShardedWriter
from .transform import (
    LayerTransform, check_transform, default_transform, fold_head_norm, fold_layer_norms, global_basis, principal_basis,
)
from .weights import FolderWeights, GGUFWeights, ModelWeights, check_complete

# The reference code scores only these two with column norms; the paper scores all seven.
REFERENCE_NORM_SCORED = ("k", "gate")
# What peak_host_bound leaves out besides Python and the libraries: the allocator's caches and thread pools
# (about 20 MiB on a one-layer model, tests/test_streaming.py); growth past bound + this is warned about
PROCESS_ALLOWANCE = 128 << 20


@dataclass
class ConvertReport:
    out: Path
    levels: dict[float, list[dict[str, float]]]  # level -> per-layer projection sparsities
    layer_seconds: list[float]
    seconds: float = 0.0
    peak_host_bytes: int = 0
    peak_gpu_bytes: int | None = None
    resumed_layers: int = 0  # layers a resumed run found finished
    host_bound_bytes: int | None = None  # peak_host_bound: what a streamed run should stay under, besides Python
    start_host_bytes: int = 0  # peak host memory before any weight was read (Python, libraries, tokenizer, metadata)

    def host_growth_over_bound(self) -> int | None:
        """Bytes a streamed conversion's host memory grew past its bound and the process allowance, else None."""
        if self.host_bound_bytes is None:
            return None
        over = self.peak_host_bytes - self.start_host_bytes - self.host_bound_bytes - PROCESS_ALLOWANCE
        return over if over > 0 else None


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
    return levels


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


def open_weights(source: sources.ModelSource, skeleton):
    """(the source's weights, read tensor by tensor, and what identifies their files for resume.py); only
    metadata is read here."""
    if source.gguf_file:
        files = GGUFWeights(Path(source.location) / source.gguf_file, skeleton)
    else:
        local = Path(source.location)
        files = FolderWeights(local if local.is_dir() else sources.hub_snapshot(source), source.model_id)
    identity = files.fingerprint()
    if not source.gguf_file and not Path(source.location).is_dir():
        identity = {"commit": files.folder.name, "files": identity}  # a Hub snapshot's folder is its commit
    return files, identity


def peak_host_bound(model, tokens: int, work_dtype: torch.dtype, settings: CalibrationSettings) -> int:
    """What a streamed conversion should hold at most, in bytes, besides the process's own overhead (Python,
    the libraries' code, the allocator's caches): embeddings + lm_head (float32), three decoder layers in
    float64 (the layer, its transform's float64 copies, the read-ahead basis), the calibration activations
    three times (inputs, outputs, the greedy search's copies), the score samples (per projection, one
    float32 per token and input channel, at most settings.max_scores), and the largest tensor twice more in
    float32 while it is read (a bf16 or quantized copy decoding into the float32 one)."""
    state = model.state_dict()
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    ends = sum(state[n].numel() for n in end_names(model))
    largest = max(t.numel() for t in state.values())
    activations = tokens * model.config.hidden_size * work_dtype.itemsize
    samples = sum(min(settings.max_scores, tokens * inputs) for inputs, _ in projection_sizes(model.config).values()) * 4
    return ends * 4 + 3 * layer_params * 8 + 3 * activations + samples + 2 * largest * 4


def release_freed_layers() -> None:
    """Make glibc return large freed blocks to the system. By default it raises its mmap threshold to the
    largest block freed, after which a layer's tensors come from a heap that keeps their pages once freed:
    a 24-layer stream then held ~200 MB more than one layer needs. A fixed threshold keeps blocks of 1 MiB
    and more mmapped, so a dropped layer leaves the process (no-op off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space (ru_maxrss
    would also count the RSS of the process that started this one, which Linux carries over an exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def convert(options: ConvertOptions, progress=None, say=print) -> ConvertReport:
    started = time.perf_counter()
    if not options.in_memory:
        release_freed_layers()
    source = sources.resolve_source(options.model, options.revision)
    local = Path(source.location) if Path(source.location).is_dir() else None
    default_chosen = options.default_sparsity is None
    levels = validate(options, local)
    device = sources.resolve_device(options.device)
    sources.check_local_folder(source)
    config = sources.load_config(source)
    if isinstance(getattr(config, "winaconv", None), dict):  # a Hub id (local folders are refused in validate)
        refuse_checkpoint_source(source.model_id)
    check_context(config, options.seq_len)
    family = family_for_model_type(config.model_type)
    transform = options.transform or default_transform(family)
    check_transform(family, transform)
    calibration = load_calibration_text(options.calib_file, options.calib_dataset)
    if calibration.note:
        say(calibration.note)
    if default_chosen and options.default_sparsity != 0.5:
        say(f"default sparsity: {options.default_sparsity:g} (the level loaded without sparsity=; "
            "--default-sparsity picks another)")
    save_dtype = sources.source_dtype(config, options.dtype)
    work_dtype = torch.float32 if device == "cpu" else save_dtype

    say(f"loading {source.model_id}" + (" (whole)" if options.in_memory else " (layer by layer)"))
    tokenizer = sources.load_tokenizer(source)
    norm_scored = norm_scored_projections(options.method, options.scoring)
    model = skeleton(config, winaconv_section(options.method, transform, norm_scored))
    model.generation_config = sources.load_generation_config(source, config)
    weights, source_files = open_weights(source, model)
    # what the conversion's data adds is measured from here: the tokenizer and the source's metadata (a GGUF's
    # vocabulary is hundreds of MB of Python objects) are the process's overhead, like the libraries
    start_host_bytes = peak_rss_bytes()
    if options.in_memory:
        weights = ModelWeights(sources.load_model(source, torch.float32))
    check_complete(weights, needed_names(model), source.model_id)
    load_ends(model, weights)

    input_ids = token_sequences(tokenizer, calibration.texts, options.seq_len, options.calib_tokens, options.seed)
    note = calibration_note(int(input_ids.numel()), options)
    if note:
        say(note)
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
    bound = peak_host_bound(model, int(input_ids.numel()), work_dtype, settings)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stamp = fingerprint(options, source.model_id, source_files, input_ids, device, config, model.generation_config)
    metadata = {**SAFETENSORS_METADATA, CONVERSION_ID_KEY: conversion_id(stamp)}
    with atomic_folder(Path(options.out), options.overwrite, local, stamp) as staging:
        journal = ResumeJournal(staging, stamp)
        resumed = journal.progress()
        if resumed:
            say(f"resuming after layer {len(resumed.calibrations)} of {config.num_hidden_layers} "
                "(an interrupted run of this command)")
        journal.start()
        say(f"transform: {transform}")
        basis = journal.basis()
        if basis is None and transform in ("global", "pca"):
            basis = model_wide_basis(model, family, transform, weights, input_ids, device, progress)
            journal.save_basis(basis)
        plan = LayerTransform(transform, family, model.config, weights.read, device, basis)
        plan.ends(model)  # a tied lm_head is untied here where the transform folds the final norm into it

        names = saved_state_names(model)
        state = model.state_dict()
        writer = ShardedWriter(staging, {n: (save_dtype, tuple(state[n].shape)) for n in names},
                               parse_shard_size(options.max_shard_size), metadata,
                               resume=resumed is not None)
        for name in names:
            if not name.startswith(LAYER_PREFIX):
                writer.put(name, state[name].to(save_dtype))
        del state
        for module in (model.get_input_embeddings(), model.model.norm, model.lm_head):
            module.to(work_dtype)
        if resumed:
            writer.mark_written(n for i in range(len(resumed.calibrations)) for n in layer_names(model, i))

        def finished(index, layer, calibration_progress):
            for name, tensor in layer.state_dict().items():
                writer.put(f"{LAYER_PREFIX}{index}.{name}", tensor.to(save_dtype))
            writer.sync()  # the layer's tensors are on disk before the journal says it is done
            journal.save_layer(calibration_progress)

        layers_in = StreamedLayers(model, weights, prepare=plan.layer, dtype=work_dtype)
        try:
            layers = calibrate_layers(model, family, input_ids, shares, settings, progress, layers_in,
                                      resume=resumed, on_layer=finished)
        except KeyboardInterrupt:
            done = finished_layers(staging)
            if done:
                say(f"interrupted after {done} of {config.num_hidden_layers} layers; run the same command "
                    "again to resume from there (--overwrite with other settings discards it)")
            raise
        del weights
        divergences = None
        if options.layer_allocation == "divergence":
            say("measuring each layer's effect on the output")
            points = sorted({*levels, settings.path_end})
            written = StreamedLayers(model, FolderWeights(staging), dtype=work_dtype)  # the transformed layers
            writer.sync()
            divergences = points, output_divergences(model, family, layers, input_ids[:settings.greedy_sequences],
                                                     shares, points, settings, decoder_layers=written)

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
            conversion_id=metadata[CONVERSION_ID_KEY],
            score_max=[[float(layer.grids[p][-1]) for p in PROJECTIONS] for layer in layers],
        )
        model.config.dtype = save_dtype
        say(f"writing {options.out}")
        write_checkpoint_files(model, family, tokenizer, staging)
        writer.close()
        journal.finish()

    return ConvertReport(
        out=Path(options.out),
        levels=sparsities,
        layer_seconds=[layer.seconds for layer in layers],
        seconds=time.perf_counter() - started,
        peak_host_bytes=peak_rss_bytes(),
        start_host_bytes=start_host_bytes,
        peak_gpu_bytes=torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        resumed_layers=len(resumed.calibrations) if resumed else 0,
        host_bound_bytes=None if options.in_memory else bound,
    )


@torch.no_grad()
def model_wide_basis(model, family, kind: str, weights, input_ids, device, progress=None) -> torch.Tensor:
    """The one Q of the global / pca transform, from a first pass over the norm-folded layers."""
    task = progress.add_task(f"{kind} basis (first pass)", total=model.config.num_hidden_layers) if progress else None

    def prepare(layer, index):
        fold_layer_norms(layer, family)
        if progress:
            progress.update(task, completed=index + 1)

    folded = StreamedLayers(model, weights, prepare=prepare)
    if kind == "global":
        return global_basis(_each(folded), family, device)
    fold_head_norm(model)  # the covariance counts the final norm's output, whose gain goes to lm_head
    return principal_basis(residual_covariance(model, input_ids, device, layers=folded))


def _each(layers):
    for index in range(len(layers)):
        with layers.open(index) as layer:
            yield layer
