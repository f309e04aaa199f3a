"""Gating-score statistics: the scores a layer's projections see on the calibration text, kept as quantile
grids that map a sparsity level of one projection to its threshold."""

import numpy as np
import torch

from winaconv_runtime.architectures import PROJECTIONS
from winaconv_runtime.modeling_winaconv import sparse_linears

from .layers import layer_outputs

GRID_POINTS = 2049  # quantiles stored per projection: thresholds resolved to 1/2048 in sparsity


def gating_scores(x: torch.Tensor, column_norms: torch.Tensor | None) -> torch.Tensor:
    """|x_i| * ||W[:, i]|| (WINA) or |x_i| (TEAL) for every token and channel."""
    scores = x.detach().float().abs()
    return scores if column_norms is None else scores * column_norms


class ScoreSampler:
    """Keeps a uniform random subsample of the scores seen, at most `capacity` values."""

    def __init__(self, capacity: int, total: int, generator: torch.Generator):
        self.keep_fraction = min(1.0, capacity / max(total, 1))
        self.generator = generator
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor, column_norms: torch.Tensor | None) -> None:
        """Sample the gating scores of input `x` (scored with `column_norms`, see gating_scores). Only the
        sampled entries are scored: the same values as scoring all of them and sampling those."""
        flat = x.detach().reshape(-1)
        if self.keep_fraction < 1.0:
            count = max(1, int(flat.numel() * self.keep_fraction))
            index = torch.randint(flat.numel(), (count,), generator=self.generator).to(flat.device)
            norms = None if column_norms is None else column_norms[index % x.shape[-1]]
            self.parts.append(gating_scores(flat[index], norms).cpu())
        else:
            self.parts.append(gating_scores(x, column_norms).reshape(-1).cpu())

    def quantile_grid(self) -> torch.Tensor:
        return quantile_grid(torch.cat(self.parts))


def quantile_grid(scores: torch.Tensor) -> torch.Tensor:
    """GRID_POINTS evenly spaced order statistics of `scores` (any shape), smallest first."""
    values = _sorted(scores.reshape(-1))
    positions = torch.linspace(0, values.numel() - 1, GRID_POINTS, device=values.device).round().long()
    return values[positions]


def _sorted(values: torch.Tensor) -> torch.Tensor:
    """Ascending copy. On the CPU numpy's sort (vectorised) gives the same values many times faster than torch's."""
    if values.device.type == "cpu" and values.dtype == torch.float32:
        return torch.from_numpy(np.sort(values.numpy()))
    return values.sort().values


def threshold_at(grid: torch.Tensor, sparsity: float) -> float:
    """The score under which a fraction `sparsity` of the calibration scores fall."""
    if sparsity <= 0:
        return 0.0
    position = min(sparsity, 1.0) * (grid.numel() - 1)
    low = int(position)
    high = min(low + 1, grid.numel() - 1)
    weight = position - low
    return float(grid[low] * (1 - weight) + grid[high] * weight)


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
