"""Allocation: how sparse each projection of each layer is at each level.

Within a layer, TEAL's greedy search (greedy_path) walks from all-dense, one step at a time, raising the
projection whose step adds the least block-output error; the layer's path is its LayerCalibration. Across
layers a model-level level is met either by every layer at that level ("uniform", TEAL's rule) or by sharing
it out by each layer's cost: its greedy block-error curve ("error") or the model's output divergence with that
layer sparse ("divergence", sensitivity.py); see layer_targets.
"""

import math
from dataclasses import dataclass

import torch

from winaconv_runtime.architectures import EXPERT_PROJECTIONS, PROJECTIONS
from winaconv_runtime.modeling_winaconv import routed_experts, sparse_linears
from winaconv_runtime.sparse_experts import set_expert_thresholds

from ..options import LAYER_ALLOCATIONS
from .greedy import BlockTrials
from .statistics import EXPERT_GRIDS, threshold_at, thresholds_at

MAX_PROJECTION_SPARSITY = 0.995
# With a non-uniform allocation a layer may go this far above the highest level wanted (its greedy path
# runs that far), so that the layers that lose least can carry more of the model's sparsity.
ALLOCATION_HEADROOM = 0.15
MAX_LAYER_SPARSITY = 0.9


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

    def thresholds_for(self, sparsities: dict[str, float]) -> dict:
        """Per projection its threshold; in a MoE layer also, under EXPERT_GRIDS' keys, one per routed expert."""
        thresholds = {p: threshold_at(self.grids[p], sparsities[p]) for p in PROJECTIONS}
        for p, key in EXPERT_GRIDS.items():
            if key in self.grids:
                thresholds[key] = thresholds_at(self.grids[key], sparsities[p]).tolist()
        return thresholds

    def expert_score_max(self) -> list[list[float]] | None:
        """The largest score calibration saw, [expert][gate, up, down] (None in a dense layer)."""
        if EXPERT_GRIDS["gate"] not in self.grids:
            return None
        return torch.stack([self.grids[EXPERT_GRIDS[p]][:, -1] for p in EXPERT_PROJECTIONS], dim=1).tolist()


def expert_table(thresholds: dict) -> list[list[float]] | None:
    """A MoE layer's routed-expert thresholds as [expert][gate, up, down] (None in a dense layer)."""
    if EXPERT_GRIDS["gate"] not in thresholds:
        return None
    return [list(row) for row in zip(*(thresholds[EXPERT_GRIDS[p]] for p in EXPERT_PROJECTIONS))]


def level_tables(thresholds: list[dict]) -> tuple[list[list[float]], list | None]:
    """A level's [layer][projection] thresholds and, for a MoE model, its [layer][expert][3] expert thresholds."""
    experts = [expert_table(t) for t in thresholds]
    return [[t[p] for p in PROJECTIONS] for t in thresholds], (None if experts[0] is None else experts)


def apply_thresholds(layer, family, thresholds: dict, norm_scored) -> None:
    for projections, linear in sparse_linears(layer, family):
        linear.set_thresholds([thresholds[p] for p in projections], [p in norm_scored for p in projections])
    experts = routed_experts(layer, family)
    if experts is not None:
        set_expert_thresholds(experts, expert_table(thresholds), [p in norm_scored for p in EXPERT_PROJECTIONS])


def clear_thresholds(layer, family) -> None:
    """Every projection of the layer dense again."""
    for _, linear in sparse_linears(layer, family):
        linear.set_thresholds(None, None)
    experts = routed_experts(layer, family)
    if experts is not None:
        set_expert_thresholds(experts, None, None)


@torch.no_grad()
def greedy_path(layer, family, grids, inputs, reference, layer_kwargs, shares, settings,
                on_step=None) -> tuple[list[dict], list[float]]:
    """TEAL's greedy allocation for one layer: the path of per-projection sparsities and its errors.

    From all-dense, repeatedly raise by one step (base step / parameter share) the projection
    whose step adds the least block-output error, until the weighted sparsity reaches the
    path's end (settings.path_end). The trials' block outputs come from greedy.BlockTrials, which
    computes each piece once (the same bits as a plain forward per trial).
    Errors are relative to the dense output's own scale, the better of two cross-layer yardsticks measured
    for the "error" allocation: relative errors send sparsity to the late layers, absolute ones to the early
    layers, which measured far worse (docs/results.md).
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
