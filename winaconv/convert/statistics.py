"""Gating-score statistics: the scores a layer's projections see on the calibration text, kept as quantile
grids that map a sparsity level of one projection to its threshold. A MoE layer's routed experts get one grid
per expert and projection (under EXPERT_GRIDS' keys), made by the layer's expert rule (docs/moe.md)."""

import contextlib

import numpy as np
import torch

from winaconv_runtime.architectures import EXPERT_PROJECTIONS, PROJECTIONS
from winaconv_runtime.modeling_winaconv import routed_experts, sparse_linears
from winaconv_runtime.sparse_experts import column_norms as expert_column_norms

from ..options import EXPERT_CALIBRATIONS as EXPERT_RULES
from .layers import layer_outputs

GRID_POINTS = 2049  # quantiles stored per projection: thresholds resolved to 1/2048 in sparsity
# The routed experts' grids [experts, GRID_POINTS] in a layer's grids, beside the seven projections' own
EXPERT_GRIDS = {p: f"experts.{p}" for p in EXPERT_PROJECTIONS}
# How an expert's grid is made from the scores the router sent it: its own quantiles ("own"), the quantiles of
# all the layer's experts pooled ("pooled", the default: the measured best, docs/moe.md), or its own shrunk towards
# the pooled ones by its token count n, weight n / (n + EXPERT_PRIOR_TOKENS) on its own ("shrink").
EXPERT_PRIOR_TOKENS = 64


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


def thresholds_at(grids: torch.Tensor, sparsity: float) -> torch.Tensor:
    """threshold_at of every row of grids [rows, points] at once (a layer's experts): the same interpolation in
    the same float32 arithmetic."""
    if sparsity <= 0:
        return torch.zeros(grids.shape[0])
    position = min(sparsity, 1.0) * (grids.shape[1] - 1)
    low = int(position)
    high = min(low + 1, grids.shape[1] - 1)
    weight = position - low
    return grids[:, low] * (1 - weight) + grids[:, high] * weight


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
    experts = routed_experts(layer, family)
    expert_samplers = None
    if experts is not None:
        top_k = layer.mlp.gate.top_k
        expert_samplers = ExpertSamplers(experts, settings.norm_scored, settings.max_scores,
                                         total_per_input * top_k, generator)
    try:
        with expert_samplers.recording() if expert_samplers else contextlib.nullcontext():
            outputs = layer_outputs(layer, hidden, layer_kwargs, settings.device, settings.micro_batch)
    finally:
        for handle in handles:
            handle.remove()
    grids = {p: samplers[p].quantile_grid() if p in samplers else torch.zeros(GRID_POINTS) for p in PROJECTIONS}
    if expert_samplers is not None:  # (gate/up/down stay zero grids where there is no shared expert: no matrix)
        grids.update(expert_samplers.grids(settings.expert_rule))
    return grids, outputs


class ExpertSamplers:
    """Score samples of a layer's routed experts, per expert and projection, from the tokens the router sends
    each: gate and up score the block's normed input, down the expert's own activation act(gate) * up
    (recomputed densely here). Every expert keeps its scores at one common rate, so that their union is a
    token-weighted sample of the pooled scores."""

    def __init__(self, experts, norm_scored, capacity: int, pairs: int, generator):
        self.experts, self.norm_scored = experts, norm_scored
        count, width2, hidden = experts.gate_up_proj.shape
        inputs = {"gate": hidden, "up": hidden, "down": width2 // 2}
        self.samplers = {p: [ScoreSampler(capacity, pairs * inputs[p], generator) for _ in range(count)]
                         for p in EXPERT_PROJECTIONS}
        self.tokens = [0] * count

    @contextlib.contextmanager
    def recording(self):
        handle = self.experts.register_forward_pre_hook(lambda module, args: self.add(*args[:2]))
        try:
            yield self
        finally:
            handle.remove()

    @torch.no_grad()
    def add(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> None:
        experts = self.experts
        norms_gate_up, norms_down = expert_column_norms(experts)
        width = experts.down_proj.shape[-1]
        for expert in top_k_index.unique().tolist():
            token = (top_k_index == expert).any(dim=-1).nonzero().view(-1)
            x = hidden_states[token]
            gate_up = experts.gate_up_proj[expert]
            h = experts.act_fn(x @ gate_up[:width].t()) * (x @ gate_up[width:].t())
            inputs = {"gate": (x, norms_gate_up[expert, 0]), "up": (x, norms_gate_up[expert, 1]),
                      "down": (h, norms_down[expert])}
            for p, (values, norms) in inputs.items():
                self.samplers[p][expert].add(values, norms if p in self.norm_scored else None)
            self.tokens[expert] += int(token.numel())

    def grids(self, rule: str) -> dict[str, torch.Tensor]:
        """[experts, GRID_POINTS] per projection under EXPERT_GRIDS' keys, by the expert rule (EXPERT_RULES)."""
        if rule not in EXPERT_RULES:
            raise ValueError(f"unknown expert rule {rule!r}; choose from {', '.join(EXPERT_RULES)}")
        grids = {}
        for p, samplers in self.samplers.items():
            pooled = quantile_grid(torch.cat([part for s in samplers for part in s.parts]))
            rows = []
            for sampler, tokens in zip(samplers, self.tokens):
                if rule == "pooled" or tokens == 0:
                    rows.append(pooled)
                    continue
                own = sampler.quantile_grid()
                weight = 1.0 if rule == "own" else tokens / (tokens + EXPERT_PRIOR_TOKENS)
                rows.append(weight * own + (1 - weight) * pooled)
            grids[EXPERT_GRIDS[p]] = torch.stack(rows)
        return grids
