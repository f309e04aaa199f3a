"""Calibration, one decoder layer at a time: score statistics, then the layer's greedy allocation path.

Only one decoder layer is on the compute device at a time; the calibration activations (one hidden-state
tensor for all sequences) are the only other large state. Layer l sees the outputs of layer l-1 on the same
sequences: dense (TEAL's rule), or with layer l-1 already sparse at one level (settings.upstream_level), so
its statistics come from the inputs it meets when sparse.
"""

from dataclasses import dataclass, field

import torch

from winaconv_runtime.architectures import PROJECTIONS
from winaconv_runtime.checkpoint_format import SparsitySettings, record_norm_scored, store_level
from winaconv_runtime.modeling_winaconv import routed_experts, sparse_linears

from .allocate import LayerCalibration, apply_thresholds, clear_thresholds, greedy_path, level_tables
from .layers import capture_layer_inputs, layer_outputs
from .statistics import GRID_POINTS, ExpertSamplers, collect_statistics, gating_scores, quantile_grid, scoring_norms


@dataclass
class CalibrationSettings:
    norm_scored: tuple[str, ...]
    max_sparsity: float  # the greedy path runs up to this parameter-weighted layer sparsity
    greedy_sequences: int  # how many calibration sequences the greedy search evaluates on
    greedy_step: float = 0.025
    tail_fraction: float = 0.25  # the error is measured on the last positions of each sequence
    micro_batch: int = 8
    max_scores: int = 1 << 22  # score samples kept per projection
    seed: int = 0
    device: str = "cpu"
    path_limit: float | None = None  # weighted sparsity the greedy path runs to (None: max_sparsity)
    upstream_level: float | None = None  # pass each layer's outputs on at this level (None: dense)
    expert_rule: str = "pooled"  # how a routed expert's grid is made (statistics.EXPERT_RULES)

    @property
    def path_end(self) -> float:
        return self.max_sparsity if self.path_limit is None else max(self.max_sparsity, self.path_limit)


@dataclass
class CalibrationProgress:
    """Where layer-by-layer calibration stands after some layers: what a resumed run starts from."""
    calibrations: list = field(default_factory=list)  # LayerCalibration of the finished layers
    hidden: torch.Tensor | None = None  # what the next layer reads
    generator_state: torch.Tensor | None = None  # the score sampler's random state


class Calibrator:
    """Calibrates the decoder layers in order, each on what the one before passed on:
    `calibrator.layer(index, layer)` for index = calibrator.done, done + 1, ...; `resume` starts after the layers
    an interrupted run finished. `on_greedy_step(weighted sparsity)` reports the greedy search's progress."""

    def __init__(self, model, family, input_ids, shares, settings: CalibrationSettings,
                 resume: CalibrationProgress | None = None, on_greedy_step=None):
        self.family, self.shares, self.settings, self.on_greedy_step = family, shares, settings, on_greedy_step
        self.generator = torch.Generator().manual_seed(settings.seed)
        hidden, self.layer_kwargs = capture_layer_inputs(model, input_ids, settings.device)
        self.calibrations = []
        if resume is not None:
            self.calibrations, hidden = list(resume.calibrations), resume.hidden.to(hidden.device)
            self.generator.set_state(resume.generator_state)
        if hidden.numel() * hidden.element_size() > (1 << 30):
            hidden = hidden.cpu()  # large calibration sets wait in host memory; micro-batches go to the device
        self.hidden = hidden  # what the next layer reads

    @property
    def done(self) -> int:
        return len(self.calibrations)

    @torch.no_grad()
    def layer(self, index: int, layer) -> LayerCalibration:
        """Statistics and greedy path of decoder layer `index` (the next one), and its outputs for the next."""
        settings, family, kwargs = self.settings, self.family, self.layer_kwargs[index]
        layer.to(settings.device)
        grids, outputs = collect_statistics(layer, family, self.hidden, kwargs, settings, self.generator)
        greedy = slice(0, settings.greedy_sequences)
        path, errors = greedy_path(layer, family, grids, self.hidden[greedy], outputs[greedy], kwargs, self.shares,
                                   settings, on_step=self.on_greedy_step)
        calibrated = LayerCalibration(grids=grids, path=path, errors=errors)
        if settings.upstream_level:  # the next layer sees this one sparse, at its own allocation of the level
            sparsities = calibrated.sparsities_at(settings.upstream_level, self.shares)
            apply_thresholds(layer, family, calibrated.thresholds_for(sparsities), settings.norm_scored)
            outputs = layer_outputs(layer, self.hidden, kwargs, settings.device, settings.micro_batch)
            clear_thresholds(layer, family)
        layer.to("cpu")
        self.hidden = outputs
        self.calibrations.append(calibrated)
        return calibrated

    def progress(self) -> CalibrationProgress:
        """What a resumed run needs to go on after the layers calibrated so far."""
        return CalibrationProgress(self.calibrations, self.hidden, self.generator.get_state())


def calibrate_layers(model, family, input_ids, shares, settings: CalibrationSettings) -> list[LayerCalibration]:
    """The calibration stage alone, over a model held whole in memory (tests and studies)."""
    calibrator = Calibrator(model, family, input_ids, shares, settings)
    for index, layer in enumerate(model.model.layers):
        calibrator.layer(index, layer)
    return calibrator.calibrations


@torch.no_grad()
def uniform_levels(model, family, input_ids: torch.Tensor, levels, norm_scored=(), expert_rule="pooled") -> dict:
    """Stores levels where every projection has the level's own sparsity (TEAL's uniform allocation),
    thresholds taken from one dense pass over `input_ids`. For speed runs and tests, where the
    greedy search's cost buys nothing; accuracy comes from calibrate_layers."""
    model.set_sparsity(0)
    grids, handles, experts = {}, [], []
    for layer_idx, layer in enumerate(model.model.layers):
        if routed_experts(layer, family) is not None:
            experts.append(ExpertSamplers(routed_experts(layer, family), norm_scored, 1 << 22,
                                          input_ids.numel() * layer.mlp.gate.top_k, torch.Generator().manual_seed(0)))
            handles.append(experts[-1].experts.register_forward_pre_hook(
                lambda module, args, samplers=experts[-1]: samplers.add(*args[:2])))
        for projections, linear in sparse_linears(layer, family):
            norms = scoring_norms(linear, projections, norm_scored)

            def record(module, args, layer_idx=layer_idx, norms=norms):
                for p, n in norms.items():
                    grids[layer_idx, p] = quantile_grid(gating_scores(args[0], n)).cpu()

            handles.append(linear.register_forward_pre_hook(record))
    try:
        model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
    section = model.config.winaconv
    record_norm_scored(section, norm_scored)
    rows = range(len(model.model.layers))
    expert_grids = [samplers.grids(expert_rule) for samplers in experts]
    for level in levels:
        calibrations = [LayerCalibration(grids={**{p: grids.get((i, p), torch.zeros(GRID_POINTS)) for p in PROJECTIONS},
                                                **(expert_grids[i] if expert_grids else {})}, path=[], errors=[])
                        for i in rows]
        thresholds, expert_thresholds = level_tables([c.thresholds_for(dict.fromkeys(PROJECTIONS, level))
                                                      for c in calibrations])
        store_level(section, level, thresholds, [[level] * len(PROJECTIONS) for _ in rows], expert_thresholds)
    model.sparsity_settings = SparsitySettings.from_config(model.config)
    return section["levels"]
