"""The conversion pipeline: a source model in, a checkpoint folder with every sparsity level out.

    check       the options, the output folder and the source, before anything slow    checks.py
    open        the source's config, tokenizer and weights (read tensor by tensor);     sources.py, weights.py
                the runtime model as a meta-device skeleton, its ends loaded            layers.py
    basis       global / pca: a first pass over the layers for the one rotation         transform.py
    for each decoder layer (after the last one an interrupted run finished):
      read        the layer from the source                                            layers.DecoderLayers
      transform   norms folded and rotations applied, exactly, in float64               transform.LayerTransform
      calibrate   score statistics and the layer's greedy allocation path              calibrate.Calibrator
      write       its tensors into the shards                                          write.ShardedWriter
      journal     what a resumed run starts from                                       resume.ResumeJournal
    allocate    each layer's share of every level, then its thresholds                allocate.py, sensitivity.py
    finish      the config section, tokenizer and runtime files; the folder into place  write.py, checkpoint/folder.py
"""

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from winaconv_runtime.architectures import PROJECTIONS, family_for_model_type, parameter_shares
from winaconv_runtime.checkpoint_format import CONVERSION_ID_KEY, SAFETENSORS_METADATA, record_conversion, store_level

from .. import sources
from ..checkpoint.folder import atomic_folder
from ..interrupts import raise_if_interrupted
from ..options import ConvertOptions, norm_scored_projections
from .allocate import ALLOCATION_HEADROOM, MAX_LAYER_SPARSITY, LayerCalibration, layer_targets, level_tables
from .calibrate import CalibrationSettings, Calibrator
from .calibration_data import load_calibration_text, token_sequences
from .checks import calibration_note, check_context, refuse_checkpoint_source, validate
from .layers import LAYER_PREFIX, DecoderLayers, layer_names, load_ends, needed_names
from .memory import PROCESS_ALLOWANCE, peak_host_bound, peak_rss_bytes, release_freed_layers
from .resume import ResumeJournal, ResumePolicy, conversion_id, fingerprint
from .runtime_model import skeleton, winaconv_section
from .sensitivity import output_divergences
from .transform import LayerTransform, check_transform, default_transform, model_wide_basis
from .weights import FolderWeights, ModelWeights, check_complete, open_weights
from .write import ShardedWriter, parse_shard_size, saved_state_names, write_checkpoint_files


@dataclass
class ConvertReport:
    out: Path
    levels: dict[float, list[dict[str, float]]]  # level -> per-layer projection sparsities
    layer_seconds: list[float]
    default_sparsity: float = 0.0  # the level loaded without sparsity=
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


def convert(options: ConvertOptions, progress=None, say=print) -> ConvertReport:
    started = time.perf_counter()
    if not options.in_memory:
        release_freed_layers()

    # check
    source = sources.resolve_source(options.model, options.revision)
    local = Path(source.location) if Path(source.location).is_dir() else None
    levels, default_sparsity = validate(options, local)
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
    if options.default_sparsity is None and default_sparsity != 0.5:
        say(f"default sparsity: {default_sparsity:g} (the level loaded without sparsity=; "
            "--default-sparsity picks another)")
    save_dtype = sources.source_dtype(config, options.dtype)
    work_dtype = torch.float32 if device == "cpu" else save_dtype

    # open
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
    settings = calibration_settings(options, levels, default_sparsity, norm_scored, device)
    shares = parameter_shares(model.config)
    bound = peak_host_bound(model, int(input_ids.numel()), work_dtype, settings)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    stamp = fingerprint(replace(options, default_sparsity=default_sparsity), source.model_id, source_files,
                        input_ids, device, config, model.generation_config)
    metadata = {**SAFETENSORS_METADATA, CONVERSION_ID_KEY: conversion_id(stamp)}
    resume_policy = ResumePolicy(stamp)
    with atomic_folder(Path(options.out), options.overwrite, local, resume_policy) as staging:
        journal = ResumeJournal(staging, stamp)
        resumed = journal.progress()
        if resumed:
            say(f"resuming after layer {len(resumed.calibrations)} of {config.num_hidden_layers} "
                "(an interrupted run of this command)")
        journal.start()

        # basis
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
                               parse_shard_size(options.max_shard_size), metadata, resume=resumed is not None)
        for name in names:
            if not name.startswith(LAYER_PREFIX):
                writer.put(name, state[name].to(save_dtype))
        del state
        for module in (model.get_input_embeddings(), model.model.norm, model.lm_head):
            module.to(work_dtype)
        if resumed:
            writer.mark_written(n for i in range(len(resumed.calibrations)) for n in layer_names(model, i))

        source_layers = DecoderLayers(model, weights)
        shown = LayerProgress(progress, len(source_layers), settings.path_end)
        calibrator = Calibrator(model, family, input_ids, shares, settings, resume=resumed,
                                on_greedy_step=shown.greedy_step)
        shown.start(calibrator.done)
        try:
            for index in range(calibrator.done, len(source_layers)):
                layer_started = time.perf_counter()
                with source_layers.open(index) as layer:  # read
                    plan.layer(layer, index)  # transform
                    layer.to(work_dtype)
                    shown.layer(index)
                    calibrated = calibrator.layer(index, layer)  # calibrate
                    calibrated.seconds = time.perf_counter() - layer_started
                    for name, tensor in layer.state_dict().items():  # write
                        writer.put(f"{LAYER_PREFIX}{index}.{name}", tensor.to(save_dtype))
                    writer.sync()  # the layer's tensors are on disk before the journal says it is done
                    journal.save_layer(calibrator.progress())  # journal
                shown.advance()
                raise_if_interrupted()
        except KeyboardInterrupt:
            note = resume_policy.interrupted_note(staging, config.num_hidden_layers)
            if note:
                say(note)
            raise
        layers = calibrator.calibrations
        del weights

        # allocate
        divergences = None
        if options.layer_allocation == "divergence":
            say("measuring each layer's effect on the output")
            points = sorted({*levels, settings.path_end})
            written = DecoderLayers(model, FolderWeights(staging), dtype=work_dtype)  # the transformed layers
            writer.sync()
            divergences = points, output_divergences(model, family, layers, input_ids[:settings.greedy_sequences],
                                                     shares, points, settings, decoder_layers=written)
        sparsities = {}
        for level in levels:
            targets = layer_targets(layers, level, shares, options.layer_allocation, divergences)
            per_layer = [layer.sparsities_at(target, shares) for layer, target in zip(layers, targets)]
            thresholds, expert_thresholds = level_tables([layer.thresholds_for(s) for layer, s in zip(layers, per_layer)])
            store_level(model.config.winaconv, level, thresholds, [[s[p] for p in PROJECTIONS] for s in per_layer],
                        expert_thresholds)
            sparsities[level] = per_layer

        # finish
        record_conversion(
            model.config.winaconv,
            default_sparsity=default_sparsity,
            calibration=calibration_record(calibration.source, input_ids, options, settings, family),
            base_model={"id": source.model_id, "revision": source.revision},
            conversion_id=metadata[CONVERSION_ID_KEY],
            score_max=score_max(layers),
            expert_score_max=[layer.expert_score_max() for layer in layers] if family.is_moe else None,
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
        default_sparsity=default_sparsity,
        seconds=time.perf_counter() - started,
        peak_host_bytes=peak_rss_bytes(),
        start_host_bytes=start_host_bytes,
        peak_gpu_bytes=torch.cuda.max_memory_allocated() if device.startswith("cuda") else None,
        resumed_layers=len(resumed.calibrations) if resumed else 0,
        host_bound_bytes=None if options.in_memory else bound,
    )


def calibration_settings(options: ConvertOptions, levels: list[float], default_sparsity: float, norm_scored,
                         device: str) -> CalibrationSettings:
    return CalibrationSettings(
        norm_scored=norm_scored,
        max_sparsity=max(levels),
        greedy_sequences=max(1, options.greedy_tokens // options.seq_len),
        greedy_step=options.greedy_step,
        seed=options.seed,
        device=device,
        path_limit=(min(max(levels) + ALLOCATION_HEADROOM, MAX_LAYER_SPARSITY)
                    if options.layer_allocation != "uniform" else None),
        # the sparse upstream is the default level's: one stream of activations serves every level
        upstream_level=float(default_sparsity) if options.upstream == "sparse" else None,
        expert_rule=options.expert_calibration,
    )


def calibration_record(source: str, input_ids: torch.Tensor, options: ConvertOptions,
                       settings: CalibrationSettings, family=None) -> dict:
    """How the checkpoint was calibrated, as its config section records it."""
    experts = {"expert_calibration": options.expert_calibration} if family is not None and family.is_moe else {}
    return {**experts,
        "source": source,
        "tokens": int(input_ids.numel()),
        "seq_len": options.seq_len,
        "greedy_tokens": settings.greedy_sequences * options.seq_len,
        "greedy_step": options.greedy_step,
        "layer_allocation": options.layer_allocation,
        "upstream": options.upstream,
        "seed": options.seed,
    }


def score_max(layers: list[LayerCalibration]) -> list[list[float]]:
    """The largest score calibration saw, [layer][projection] (the loader's plausibility bound on thresholds)."""
    return [[float(layer.grids[p][-1]) for p in PROJECTIONS] for layer in layers]


class LayerProgress:
    """The two progress bars of the per-layer loop: layers done, and the greedy search inside the current one."""

    def __init__(self, progress, layers: int, path_end: float):
        self.progress, self.layers, self.steps = progress, layers, round(100 * path_end)

    def start(self, done: int) -> None:
        if self.progress:
            self.layer_task = self.progress.add_task("calibrating layers", total=self.layers, completed=done)
            self.step_task = self.progress.add_task("greedy allocation (%)", total=self.steps)

    def layer(self, index: int) -> None:
        if self.progress:
            self.progress.reset(self.step_task, total=self.steps, description=f"greedy allocation (%), layer {index}")

    def greedy_step(self, weighted_sparsity: float) -> None:
        if self.progress:
            self.progress.update(self.step_task, completed=min(round(100 * weighted_sparsity), self.steps))

    def advance(self) -> None:
        if self.progress:
            self.progress.advance(self.layer_task)
