"""Layer-by-layer calibration: score statistics and TEAL's greedy per-projection allocation.

Only one decoder layer is on the compute device at a time; the calibration activations
(one hidden-state tensor for all sequences) are the only other large state. Layer l sees the
outputs of layer l-1 on the same sequences: dense (TEAL's rule), or with layer l-1 already sparse at
one level (settings.upstream_level), so its statistics come from the inputs it meets when sparse.

Across layers a model-level level is met either by every layer at that level ("uniform", TEAL's
rule) or by sharing it out by each layer's cost: its greedy block-error curve ("error") or the model's
output divergence with that layer sparse ("divergence", sensitivity.py); see layer_targets.
"""

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from winaconv_runtime.architectures import PROJECTIONS
from winaconv_runtime.checkpoint_format import SparsitySettings, store_level
from winaconv_runtime.modeling_winaconv import sparse_linears

from .greedy import BlockTrials
from .options import LAYER_ALLOCATIONS
from .statistics import ScoreSampler, gating_scores, quantile_grid, threshold_at

MAX_PROJECTION_SPARSITY = 0.995
# With a non-uniform allocation a layer may go this far above the highest level wanted (its greedy path
# runs that far), so that the layers that lose least can carry more of the model's sparsity.
ALLOCATION_HEADROOM = 0.15
MAX_LAYER_SPARSITY = 0.9


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

    @property
    def path_end(self) -> float:
        return self.max_sparsity if self.path_limit is None else max(self.max_sparsity, self.path_limit)


@dataclass
class LayerCalibration:
    grids: dict[str, torch.Tensor]  # score quantiles per projection
    path: list[dict[str, float]]  # greedy path: per-projection sparsities after each step
    errors: list[float]  # block-output error after each step, relative to the dense output's scale
    seconds: float = 0.0

    def weighted(self, shares: dict[str, float]) -> list[float]:
        """Parameter-weighted layer sparsity after each step of the path."""
        return [sum(shares[p] * s[p] for p in PROJECTIONS) for s in self.path]

    def _bracket(self, target: float, shares: dict[str, float]) -> tuple[int, float] | None:
        """(step, alpha): `target` weighted sparsity lies alpha of the way from path[step - 1] to
        path[step]; None past the path's end."""
        weighted = self.weighted(shares)
        for step in range(1, len(weighted)):
            if weighted[step] >= target - 1e-9:
                span = weighted[step] - weighted[step - 1]
                return step, 1.0 if span <= 0 else (target - weighted[step - 1]) / span
        return None

    def error_at(self, target: float, shares: dict[str, float]) -> float:
        """The path's error at a weighted sparsity, linearly interpolated (the last step's beyond it)."""
        found = self._bracket(target, shares)
        if found is None:
            return self.errors[-1]
        step, alpha = found
        return self.errors[step - 1] + alpha * (self.errors[step] - self.errors[step - 1])

    def sparsities_at(self, target: float, shares: dict[str, float]) -> dict[str, float]:
        """Per-projection sparsities reaching `target` weighted sparsity, interpolated on the path."""
        found = self._bracket(target, shares)
        if found is None:
            return dict(self.path[-1])
        step, alpha = found
        before, after = self.path[step - 1], self.path[step]
        return {p: before[p] + alpha * (after[p] - before[p]) for p in PROJECTIONS}

    def thresholds_for(self, sparsities: dict[str, float]) -> dict[str, float]:
        return {p: threshold_at(self.grids[p], sparsities[p]) for p in PROJECTIONS}


class ResidentLayers:
    """The decoder layers of a model held whole in memory: `with layers.open(i) as layer` (onload.StreamedLayers
    is the same interface for layers read one at a time)."""

    def __init__(self, model):
        self.model = model

    def __len__(self) -> int:
        return len(self.model.model.layers)

    @contextlib.contextmanager
    def open(self, index: int):
        yield self.model.model.layers[index]


@dataclass
class CalibrationProgress:
    """Where layer-by-layer calibration stands after some layers: what a resumed run starts from."""
    calibrations: list = field(default_factory=list)  # LayerCalibration of the finished layers
    hidden: torch.Tensor | None = None  # what the next layer reads
    generator_state: torch.Tensor | None = None  # the score sampler's random state


class _RecordingLayer(torch.nn.Module):
    """Stands in for a decoder layer: records what the decoder passes it and returns its input."""

    def __init__(self, index: int, records: dict):
        super().__init__()
        self.index, self.records = index, records

    def forward(self, hidden_states, **kwargs):
        if self.index == 0:
            self.records["hidden"] = hidden_states
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "use_cache")}
        self.records.setdefault("kwargs", {}).setdefault(self.index, kwargs)
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model, input_ids: torch.Tensor, device) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering the first decoder layer for every sequence, and per layer the keyword
    arguments (position embeddings, mask) the decoder passes it, for one sequence. Per layer, since
    Gemma alternates sliding-window and global layers with their own masks and rotary tables."""
    decoder = model.model
    real_layers = decoder.layers
    records = {}
    decoder.layers = torch.nn.ModuleList(_RecordingLayer(i, records) for i in range(len(real_layers)))
    others = [m for name, m in decoder.named_children() if name != "layers"]
    for module in others:
        module.to(device)
    hidden = []
    try:
        for sequence in input_ids:
            decoder(input_ids=sequence[None].to(device), use_cache=False)
            hidden.append(records["hidden"])
    finally:
        decoder.layers = real_layers
        for module in others:
            module.to("cpu")
    return torch.cat(hidden), [records["kwargs"][i] for i in range(len(real_layers))]


def apply_thresholds(layer, family, thresholds: dict[str, float], norm_scored) -> None:
    for projections, linear in sparse_linears(layer, family):
        linear.set_thresholds([thresholds[p] for p in projections], [p in norm_scored for p in projections])


def clear_thresholds(layer, family) -> None:
    """Every projection of the layer dense again."""
    for _, linear in sparse_linears(layer, family):
        linear.set_thresholds(None, None)


def _output(result):
    return result[0] if isinstance(result, tuple) else result


def layer_outputs(layer, hidden, layer_kwargs, device, micro_batch: int) -> torch.Tensor:
    """The layer applied to every sequence, micro-batches on `device`, results where `hidden` lives."""
    return torch.cat([_output(layer(chunk.to(device), **layer_kwargs)).to(hidden.device)
                      for chunk in hidden.split(micro_batch)])


def scoring_norms(linear, projections, norm_scored) -> dict:
    """Per projection of `linear`: its column norms where it is scored with them (WINA), else None."""
    segments = linear.weight.split(linear.segment_sizes, dim=0)
    return {p: (w.float().norm(dim=0) if p in norm_scored else None) for p, w in zip(projections, segments)}


@torch.no_grad()
def collect_statistics(layer, family, hidden, layer_kwargs, settings, generator) -> tuple[dict, torch.Tensor]:
    """Dense pass over all sequences: score quantiles per projection and the layer's outputs."""
    total_per_input = hidden.shape[0] * hidden.shape[1]
    samplers, handles = {}, []
    for projections, linear in sparse_linears(layer, family):
        linear.set_thresholds(None, None)
        norms = scoring_norms(linear, projections, settings.norm_scored)
        for p in projections:
            samplers[p] = ScoreSampler(settings.max_scores, total_per_input * linear.in_features, generator)

        def record(module, args, projections=projections, norms=norms):
            for p in projections:
                samplers[p].add(args[0], norms[p])

        handles.append(linear.register_forward_pre_hook(record))
    try:
        outputs = layer_outputs(layer, hidden, layer_kwargs, settings.device, settings.micro_batch)
    finally:
        for handle in handles:
            handle.remove()
    return {p: samplers[p].quantile_grid() for p in PROJECTIONS}, outputs


@torch.no_grad()
def greedy_path(layer, family, grids, inputs, reference, layer_kwargs, shares, settings,
                on_step=None) -> tuple[list[dict], list[float]]:
    """TEAL's greedy allocation for one layer: the path of per-projection sparsities and its errors.

    From all-dense, repeatedly raise by one step (base step / parameter share) the projection
    whose step adds the least block-output error, until the weighted sparsity reaches the
    path's end (settings.path_end). The trials' block outputs come from greedy.BlockTrials, which
    computes each piece once (the same bits as a plain forward per trial).
    Errors are relative to the dense output's own scale, the better of two cross-layer yardsticks measured
    for the "error" allocation: relative errors send sparsity to the late layers (slightly worse than
    uniform at 25-50%, better at 65%), absolute ones to the early layers (far worse; benchmarks/accuracy_pca_4k.md).
    """
    tail = int(inputs.shape[1] * (1 - settings.tail_fraction))
    reference = reference[:, tail:].to(settings.device).float()
    inputs = inputs.to(settings.device)
    sparsity = {p: 0.0 for p in PROJECTIONS}
    path = [dict(sparsity)]

    def error(output):
        return (output.float() - reference).square().sum(dim=(0, 1)).sqrt().mean().item()

    scale = reference.square().sum(dim=(0, 1)).sqrt().mean().item() or 1.0

    with BlockTrials(layer, family, grids, settings.norm_scored, inputs, layer_kwargs, tail) as block:
        errors = [error(block.output(sparsity)) / scale]
        while sum(shares[p] * sparsity[p] for p in PROJECTIONS) < settings.path_end - 1e-9:
            best = None
            for p in PROJECTIONS:
                if sparsity[p] >= MAX_PROJECTION_SPARSITY:
                    continue
                trial = dict(sparsity)
                trial[p] = min(sparsity[p] + settings.greedy_step / shares[p], MAX_PROJECTION_SPARSITY)
                trial_error = error(block.output(trial))
                if best is None or trial_error < best[0]:
                    best = (trial_error, trial)
            if best is None:
                break
            best_error, sparsity = best
            block.step_done()
            path.append(dict(sparsity))
            errors.append(best_error / scale)
            if on_step:
                on_step(sum(shares[p] * sparsity[p] for p in PROJECTIONS))
    return path, errors


def calibrate_layers(model, family, input_ids, shares, settings, progress=None, layers=None,
                     resume: CalibrationProgress | None = None, on_layer=None) -> list[LayerCalibration]:
    """Calibrate every decoder layer in turn; returns one LayerCalibration per layer. `layers` gives the
    layers (ResidentLayers by default); `resume` skips the layers it holds; `on_layer(index, layer,
    CalibrationProgress)` runs after each layer, while the layer is still open."""
    layers = layers or ResidentLayers(model)
    generator = torch.Generator().manual_seed(settings.seed)
    hidden, layer_kwargs = capture_layer_inputs(model, input_ids, settings.device)
    results = []
    if resume is not None:
        results, hidden = list(resume.calibrations), resume.hidden.to(hidden.device)
        generator.set_state(resume.generator_state)
    if hidden.numel() * hidden.element_size() > (1 << 30):
        hidden = hidden.cpu()  # large calibration sets wait in host memory; micro-batches go to the device
    layer_task = (progress.add_task("calibrating layers", total=len(layers), completed=len(results))
                  if progress else None)
    step_task = progress.add_task("greedy allocation (%)", total=round(100 * settings.path_end)) if progress else None
    for idx in range(len(results), len(layers)):
        started = time.perf_counter()
        with layers.open(idx) as layer:
            layer.to(settings.device)
            grids, outputs = collect_statistics(layer, family, hidden, layer_kwargs[idx], settings, generator)
            if progress:
                progress.reset(step_task, total=round(100 * settings.path_end), description=f"greedy allocation (%), layer {idx}")
            greedy = slice(0, settings.greedy_sequences)
            path, errors = greedy_path(
                layer, family, grids, hidden[greedy], outputs[greedy], layer_kwargs[idx], shares, settings,
                on_step=(lambda w: progress.update(step_task, completed=min(round(100 * w), round(100 * settings.path_end)))) if progress else None,
            )
            calibrated = LayerCalibration(grids=grids, path=path, errors=errors)
            if settings.upstream_level:  # the next layer sees this one sparse, at its own allocation of the level
                sparsities = calibrated.sparsities_at(settings.upstream_level, shares)
                apply_thresholds(layer, family, calibrated.thresholds_for(sparsities), settings.norm_scored)
                outputs = layer_outputs(layer, hidden, layer_kwargs[idx], settings.device, settings.micro_batch)
                clear_thresholds(layer, family)
            layer.to("cpu")
            hidden = outputs
            calibrated.seconds = time.perf_counter() - started
            results.append(calibrated)
            if on_layer:
                on_layer(idx, layer, CalibrationProgress(results, hidden, generator.get_state()))
        if progress:
            progress.advance(layer_task)
    return results


def layer_targets(layers: list[LayerCalibration], level: float, shares: dict[str, float], allocation: str,
                  divergences: tuple[list[float], list[list[float]]] | None = None,
                  increment: float = 0.0125) -> list[float]:
    """Each layer's weighted sparsity for a model-level `level` (every layer holds the same share of
    the projections' weights, so the level is their mean). "uniform": every layer at the level.
    "error" / "divergence": from all-dense, repeatedly give `increment` to the layer whose cost grows
    least for it, until the mean reaches the level (the last increment split so the mean is exact);
    the cost is the layer's greedy-path block error, or the model's output divergence with that layer
    sparse (`divergences` = (points, one curve per layer), sensitivity.output_divergences)."""
    if allocation == "uniform" or level <= 0:
        return [level] * len(layers)
    ceilings = [min(layer.weighted(shares)[-1], MAX_LAYER_SPARSITY) for layer in layers]
    if allocation == "error":
        def cost(i, w):
            return layers[i].error_at(w, shares)
    elif allocation == "divergence":
        points, curves = divergences
        ceilings = [min(c, points[-1]) for c in ceilings]
        laws = [power_law(points, curve) for curve in curves]

        def cost(i, w):
            return laws[i][0] * w ** laws[i][1]
    else:
        raise ValueError(f"unknown layer allocation {allocation!r}; choose from {LAYER_ALLOCATIONS}")
    if sum(ceilings) < level * len(layers) - 1e-9:
        raise ValueError(f"the layers' greedy paths do not reach a mean sparsity of {level}")
    targets = [0.0] * len(layers)
    costs = [cost(i, 0.0) for i in range(len(layers))]
    needed = level * len(layers)
    while sum(targets) < needed - 1e-12:
        best, best_rise = None, None
        for i in range(len(layers)):
            if targets[i] >= ceilings[i] - 1e-12:
                continue
            step = min(increment, ceilings[i] - targets[i])
            rise = (cost(i, targets[i] + step) - costs[i]) / step
            if best_rise is None or rise < best_rise:
                best, best_rise = i, rise
        step = min(increment, ceilings[best] - targets[best], needed - sum(targets))
        targets[best] += step
        costs[best] = cost(best, targets[best])
    return targets


def power_law(points: list[float], values: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares fit values ~ a * points^b in log-log, b kept in [1, 8]: a smooth convex
    cost, so the allocation moves layers by small steps (linear interpolation between a few measured
    points gave constant marginal costs and moved layers only by whole intervals)."""
    pairs = [(math.log(p), math.log(v)) for p, v in zip(points, values) if p > 0 and v > 0]
    if len(pairs) < 2:
        return (max(values[-1], 0.0) / points[-1], 1.0)
    mean_x = sum(x for x, _ in pairs) / len(pairs)
    mean_y = sum(y for _, y in pairs) / len(pairs)
    spread = sum((x - mean_x) ** 2 for x, _ in pairs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in pairs) / spread if spread > 0 else 1.0
    slope = min(max(slope, 1.0), 8.0)
    return math.exp(mean_y - slope * mean_x), slope


@torch.no_grad()
def residual_covariance(model, input_ids: torch.Tensor, device, micro_batch: int = 8, layers=None) -> torch.Tensor:
    """sum over tokens of n n^T, float64, where n is every normed residual stream the model reads
    (each layer's two norms and the final one), layer by layer like the calibration itself."""
    layers = layers or ResidentLayers(model)
    hidden, layer_kwargs = capture_layer_inputs(model, input_ids, device)
    size = model.config.hidden_size
    covariance = torch.zeros(size, size, dtype=torch.float64, device=device)

    def accumulate(module, args, output):
        flat = output.reshape(-1, size).double()
        covariance.add_(flat.T @ flat)

    for index, kwargs in enumerate(layer_kwargs):
        with layers.open(index) as layer:
            layer.to(device)
            handles = [norm.register_forward_hook(accumulate)
                       for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
            try:
                hidden = layer_outputs(layer, hidden, kwargs, device, micro_batch)
            finally:
                for handle in handles:
                    handle.remove()
                layer.to("cpu")
    final_norm = model.model.norm.to(device)
    for chunk in hidden.split(micro_batch):
        accumulate(final_norm, None, final_norm(chunk.to(device)))
    final_norm.to("cpu")
    return covariance


@torch.no_grad()
def uniform_levels(model, family, input_ids: torch.Tensor, levels, norm_scored=()) -> dict:
    """Stores levels where every projection has the level's own sparsity (TEAL's uniform allocation),
    thresholds taken from one dense pass over `input_ids`. For speed runs and tests, where the
    greedy search's cost buys nothing; accuracy comes from calibrate_layers."""
    model.set_sparsity(0)
    grids, handles = {}, []
    for layer_idx, layer in enumerate(model.model.layers):
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
    section["norm_scored"] = list(norm_scored)
    rows = range(len(model.model.layers))
    for level in levels:
        store_level(section, level, [[threshold_at(grids[i, p], level) for p in PROJECTIONS] for i in rows],
                    [[level] * len(PROJECTIONS) for _ in rows])
    model.sparsity_settings = SparsitySettings.from_config(model.config)
    return section["levels"]
