"""Routed experts with WINA/TEAL input masking, as an implementation in transformers' ExpertsInterface.

transformers keeps a MoE layer's routed experts in one module with 3D weights, gate_up_proj [E, 2I, H] (gate rows,
then up rows) and down_proj [E, H, I], and dispatches its forward by `config._experts_implementation` to a
function (experts module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]). winaconv registers
IMPLEMENTATION there. The rule, per token and routed expert e (docs/moe.md):
    gate / up: keep input channel i  <=>  |x_i| > tau_gate_up[e, segment, i]
    down:      keep channel j of h = act(gate) * up  <=>  |h_j| > tau_down[e, j]
with tau = threshold / ||W[:, i]|| (WINA) or the threshold itself (TEAL), as sparse_linear.channel_thresholds.

Paths: no thresholds (level 0): the implementation the model was built with (transformers' own), but decode-sized
batches on the GPU take the grouped kernel keeping every channel. Decode-sized batches: the grouped Triton kernel
(GPU) or a row gather of the kept rows of W^T per routed expert (CPU).
Otherwise (prefill, large batches): the masked inputs of every (token, routed expert) pair through one grouped
product per projection (torch's grouped_mm, where it takes the dtype), else a loop over the experts with the masks
applied (masked_experts, also the reference the tests hold the other paths to).
"""

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .cpu_kernels import (COLD_BYTES, GATHER_MAX_TOKENS, MEASURED_FRACTIONS, crossover, cycled_ms, gather_supported,
                          keeping_thresholds, separate_transpose_needed)
from .expert_kernels import grouped_experts_triton, use_expert_kernel

IMPLEMENTATION = "winaconv_sparse"


def register() -> None:
    """Make IMPLEMENTATION a valid `experts_implementation` (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, sparse_experts_forward)


def install(experts: torch.nn.Module, config) -> None:
    """Route `experts` through IMPLEMENTATION, remembering the implementation it was built with for level 0."""
    register()
    current = config._experts_implementation
    if current != IMPLEMENTATION:
        experts.winaconv_dense_implementation = current
    experts.register_buffer("winaconv_tau_gate_up", None, persistent=False)
    experts.register_buffer("winaconv_tau_down", None, persistent=False)


def column_norms(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ||W[:, i]|| of every expert: gate and up [E, 2, H], down [E, I]; kept while the weights are
    unchanged (the greedy allocation sets thresholds thousands of times per layer)."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    key = (gate_up.data_ptr(), gate_up._version, down.data_ptr(), down._version, gate_up.dtype, gate_up.device)
    if getattr(experts, "_winaconv_norms_key", None) != key:
        width = down.shape[-1]
        wide = {} if gate_up.dtype == torch.float64 else {"dtype": torch.float32}  # never narrow inside the norm
        norms_gate_up = torch.linalg.vector_norm(gate_up.detach().unflatten(1, (2, width)), dim=2, **wide).float()
        norms_down = torch.linalg.vector_norm(down.detach(), dim=1, **wide).float()
        experts._winaconv_norms, experts._winaconv_norms_key = (norms_gate_up, norms_down), key
    return experts._winaconv_norms


@torch.no_grad()
def set_expert_thresholds(experts, thresholds, scored_with_norm) -> None:
    """thresholds: [E][gate, up, down] (or a [E, 3] tensor), or None for the dense experts; scored_with_norm:
    three bools (WINA's norms, or TEAL's |x|)."""
    if thresholds is None:
        experts.winaconv_tau_gate_up = experts.winaconv_tau_down = None
        experts._winaconv_rows = None  # the dense model keeps no second copy
        if experts.gate_up_proj.is_cuda:
            # the layout is settled before any level is compiled and captured (a relayout at the first sparse
            # level left the dense level's graphs holding the old copy), and decode at level 0 takes the
            # grouped kernel with thresholds that keep every channel
            _lay_out_rows(experts)
            if getattr(experts, "_winaconv_keep_all", None) is None:  # made once: captured graphs read it
                experts._winaconv_keep_all = _keep_all(experts)
        return
    norms_gate_up, norms_down = column_norms(experts)
    table = torch.as_tensor(thresholds, dtype=torch.float32).to(norms_down.device)
    scored = torch.tensor(list(scored_with_norm), device=table.device)
    tau_gate_up = _channel_thresholds(norms_gate_up, table[:, :2], scored[:2])
    tau_down = _channel_thresholds(norms_down.unsqueeze(1), table[:, 2:], scored[2:]).squeeze(1)
    for name, tau in (("winaconv_tau_gate_up", tau_gate_up), ("winaconv_tau_down", tau_down)):
        current = getattr(experts, name)
        if current is not None and current.shape == tau.shape and current.device == tau.device:
            current.copy_(tau)  # in place: compiled graphs and CUDA graphs keep reading this buffer
        else:
            setattr(experts, name, tau)
    _lay_out_rows(experts)


def _keep_all(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """Thresholds that keep every channel, as stride-0 views of one row (no per-expert memory)."""
    experts_count, width, hidden = experts.down_proj.shape[0], experts.down_proj.shape[-1], experts.gate_up_proj.shape[-1]
    row = torch.full((max(hidden, width),), float("-inf"), device=experts.gate_up_proj.device)
    return row[:hidden].expand(experts_count, 2, hidden), row[:width].expand(experts_count, width)


def _channel_thresholds(norms: torch.Tensor, thresholds: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """tau [E, segments, in] from norms [E, segments, in], thresholds [E, segments] and, per segment, whether it is
    scored with its norms: sparse_linear.channel_thresholds for every expert at once."""
    by_norm = torch.where(norms > 0, thresholds.unsqueeze(-1) / norms, torch.full_like(norms, float("inf")))
    return torch.where(scored[None, :, None], by_norm, thresholds.unsqueeze(-1).expand_as(norms))


def _lay_out_rows(experts) -> None:
    """Store each expert as W^T (every input channel one contiguous row) where one copy serves the dense
    products too (GPU, CPU float32); bf16 on the CPU keeps W and builds W^T for the gather on first use."""
    weight = experts.gate_up_proj
    if weight.is_cuda or not separate_transpose_needed(weight.dtype):
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(experts, name)
            if param.stride(1) != 1:
                param.data = param.data.transpose(1, 2).contiguous().transpose(1, 2)


def transposed_rows(experts) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up_t [E, H, 2I], down_t [E, I, H]) with unit stride along their last dimension."""
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
    if gate_up.stride(1) == 1 and down.stride(1) == 1:
        return gate_up.transpose(1, 2), down.transpose(1, 2)
    key = (gate_up.data_ptr(), gate_up._version, down.data_ptr(), down._version, gate_up.dtype)
    cached = getattr(experts, "_winaconv_rows", None)
    if cached is None or cached[0] != key:
        cached = experts._winaconv_rows = (key, gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous())
    return cached[1], cached[2]


def sparse_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The function registered as IMPLEMENTATION (see the module's docstring for its paths)."""
    dense = self.winaconv_tau_gate_up is None
    tau = getattr(self, "_winaconv_keep_all", None) if dense else (self.winaconv_tau_gate_up, self.winaconv_tau_down)
    if tau is not None and use_expert_kernel(hidden_states, top_k_index.numel(), self.act_fn):
        gate_up_t, down_t = transposed_rows(self)
        return grouped_experts_triton(hidden_states, top_k_index, top_k_weights, gate_up_t, down_t, *tau, self.act_fn)
    if dense:
        return dense_forward(self)(self, hidden_states, top_k_index, top_k_weights)
    if not hidden_states.is_cuda and gather_pays(self, hidden_states, top_k_index):
        return gathered_experts(self, hidden_states, top_k_index, top_k_weights)
    if grouped_products_supported(self, hidden_states):
        return grouped_masked_experts(self, hidden_states, top_k_index, top_k_weights)
    return masked_experts(self, hidden_states, top_k_index, top_k_weights)


def gather_pays(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> bool:
    """The measured policy: a decode-sized batch, at a kept fraction under the crossover this machine measured for
    these experts' shape (hosts of one kind differ: on some the gather reads fewer bytes but streams them slower)."""
    if top_k_index.numel() > GATHER_MAX_TOKENS or not gather_supported(hidden_states.dtype):  # (token, expert) pairs
        return False
    max_fraction = gather_crossover(experts, top_k_index.shape[1], hidden_states.dtype)
    if max_fraction <= 0:
        return False
    # the first routed expert's kept share stands for the pairs' (one comparison, no per-pair count)
    kept = (hidden_states.abs().unsqueeze(1) > experts.winaconv_tau_gate_up[top_k_index.reshape(-1)[0]]).float()
    return max_fraction >= 1 or float(kept.mean()) <= max_fraction


_crossovers: dict = {}


def gather_crossover(experts, top_k: int, dtype: torch.dtype) -> float:
    """The largest kept fraction at which the experts' row gather beats the path that runs otherwise, measured once
    per (shape, top_k, dtype, threads) on this machine (cpu_kernels.GATHER_MODE=always skips it). The experts' own
    paths are timed, not one plain linear: the gather's index building per call is part of its cost."""
    if cpu_kernels.GATHER_MODE == "always":
        return math.inf
    hidden, width = experts.gate_up_proj.shape[-1], experts.down_proj.shape[-1]
    key = (hidden, width, top_k, dtype, max(1, torch.get_num_threads()))
    if key not in _crossovers:
        _crossovers[key] = measure_gather_crossover(hidden, width, top_k, dtype, experts.act_fn)
    return _crossovers[key]


@torch.no_grad()
def measure_gather_crossover(hidden: int, width: int, top_k: int, dtype: torch.dtype, act_fn) -> float:
    """One token routed to top_k experts of constant weights, cycled through enough experts that their bytes leave
    the cache: gathered_experts at kept fractions 1/8 .. 1 (the same fraction in gate/up and down) against the
    masked path it falls back to."""
    expert_bytes = 3 * hidden * width * (torch.finfo(dtype).bits // 8)
    routings = min(16, max(2, math.ceil(COLD_BYTES / (top_k * expert_bytes))))
    count = routings * top_k
    experts = SimpleNamespace(gate_up_proj=torch.full((count, 2 * width, hidden), 0.01, dtype=dtype),
                              down_proj=torch.full((count, hidden, width), 0.01, dtype=dtype), act_fn=act_fn)
    _lay_out_rows(experts)
    x = torch.linspace(-1, 1, hidden, dtype=dtype)[None]
    weights = torch.full((1, top_k), 1 / top_k)
    routed = [(experts, x, torch.arange(r * top_k, (r + 1) * top_k)[None], weights) for r in range(routings)]
    experts.winaconv_tau_gate_up = torch.full((count, 2, hidden), 0.5)
    experts.winaconv_tau_down = torch.full((count, width), 0.5)
    fallback = grouped_masked_experts if grouped_products_supported(experts, x) else masked_experts
    fallback_ms = cycled_ms(fallback, routed)
    gather_ms = []
    for fraction in MEASURED_FRACTIONS:  # the same channels kept by every expert (cycled_ms's warm-up builds W^T)
        experts.winaconv_tau_gate_up = keeping_thresholds(fraction, hidden).expand(count, 2, hidden).contiguous()
        experts.winaconv_tau_down = keeping_thresholds(fraction, width).expand(count, width).contiguous()
        gather_ms.append(cycled_ms(gathered_experts, routed))
    return crossover(MEASURED_FRACTIONS, gather_ms, fallback_ms)


def dense_forward(experts):
    """The experts implementation the model was built with (transformers' eager loop where that was "eager")."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    name = getattr(experts, "winaconv_dense_implementation", "eager")
    eager = getattr(type(experts).forward, "__wrapped__", None) or masked_experts
    return eager if name in (None, "eager", IMPLEMENTATION) else ALL_EXPERTS_FUNCTIONS.get_interface(name, eager)


def _masked(x: torch.Tensor, tau) -> torch.Tensor:
    return x if tau is None else x * (x.abs() > tau)


def masked_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' per-expert loop with each expert's masks applied before its products (the reference rule;
    unmasked where no thresholds are set)."""
    tau_gate_up, tau_down = self.winaconv_tau_gate_up, self.winaconv_tau_down
    width = self.down_proj.shape[-1]
    out = torch.zeros_like(hidden_states)
    for expert in top_k_index.unique().tolist():
        token, slot = (top_k_index == expert).nonzero(as_tuple=True)
        x = hidden_states[token]
        gate_up = self.gate_up_proj[expert]
        gate = F.linear(_masked(x, None if tau_gate_up is None else tau_gate_up[expert, 0]), gate_up[:width])
        up = F.linear(_masked(x, None if tau_gate_up is None else tau_gate_up[expert, 1]), gate_up[width:])
        h = self.act_fn(gate) * up
        y = F.linear(_masked(h, None if tau_down is None else tau_down[expert]), self.down_proj[expert])
        # (a token meets an expert once; index_add_ took 0.1 s per call on the 2-core CI host, index_put_ microseconds)
        out.index_put_((token,), (y * top_k_weights[token, slot, None]).to(out.dtype), accumulate=True)
    return out


GROUPED_CHUNK_PAIRS = 4096  # pairs per grouped call: bounds the gathered thresholds ([pairs, 2, H] float32)


def grouped_products_supported(experts, hidden_states: torch.Tensor) -> bool:
    """Whether torch's grouped_mm takes these products: CPU float32/bfloat16/float16; CUDA bfloat16 on compute
    capability 8 or later; rows aligned to 16 bytes."""
    if not hasattr(F, "grouped_mm") or experts.gate_up_proj.dtype != hidden_states.dtype:
        return False
    dtype, hidden, width = hidden_states.dtype, hidden_states.shape[-1], experts.down_proj.shape[-1]
    if (hidden * hidden_states.element_size()) % 16 or (width * hidden_states.element_size()) % 16:
        return False
    if hidden_states.is_cuda:
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(hidden_states.device)[0] >= 8
    return hidden_states.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


def grouped_masked_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """Prefill and large batches: the (token, routed expert) pairs sorted by expert, each pair's masked input
    made at once, and one grouped product per projection (gate, up, down) over all experts: no loop over experts
    and no host sync, where masked_experts pays both once per routed expert. Long inputs go GROUPED_CHUNK_PAIRS
    pairs at a time."""
    tokens, top_k = top_k_index.shape
    per_chunk = max(1, GROUPED_CHUNK_PAIRS // top_k)
    if tokens > per_chunk:
        return torch.cat([grouped_masked_experts(self, hidden_states[start:start + per_chunk],
                                                 top_k_index[start:start + per_chunk],
                                                 top_k_weights[start:start + per_chunk])
                          for start in range(0, tokens, per_chunk)])
    experts = top_k_index.reshape(-1)
    order = torch.argsort(experts, stable=True)
    by_expert = experts[order]
    group_ends = torch.bincount(by_expert, minlength=self.gate_up_proj.shape[0]).cumsum(0).to(torch.int32)
    x = hidden_states[order // top_k]
    keep = x.abs().unsqueeze(1) > self.winaconv_tau_gate_up[by_expert]  # [pairs, 2, H]
    gate_up_t, down_t = self.gate_up_proj.transpose(1, 2), self.down_proj.transpose(1, 2)  # [E, H, 2I], [E, I, H]
    width = down_t.shape[1]
    gate = F.grouped_mm(x * keep[:, 0], gate_up_t[:, :, :width], offs=group_ends)
    up = F.grouped_mm(x * keep[:, 1], gate_up_t[:, :, width:], offs=group_ends)
    h = self.act_fn(gate) * up
    y = F.grouped_mm(h * (h.abs() > self.winaconv_tau_down[by_expert]), down_t, offs=group_ends)
    weighted = torch.empty_like(y, dtype=torch.float32)
    weighted[order] = y.float() * top_k_weights.reshape(-1)[order, None].float()  # back to (token, slot) order
    return weighted.view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def gathered_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """CPU decode: for every (token, routed expert) pair, only the kept rows of that expert's W^T are read
    (torch's embedding_bag: one bag per pair and projection, rows of all experts in one table)."""
    tokens, top_k = top_k_index.shape
    gate_up_t, down_t = transposed_rows(self)
    experts_count, hidden, width = gate_up_t.shape[0], gate_up_t.shape[1], gate_up_t.shape[2] // 2
    experts = top_k_index.reshape(-1)
    x = hidden_states.repeat_interleave(top_k, dim=0)  # one row per pair
    keep = x.abs().unsqueeze(1) > self.winaconv_tau_gate_up[experts]  # [pairs, 2, H]
    # W^T of every expert as rows of width I: row (e * H + i) * 2 + s is segment s (gate, up) of channel i
    # (embedding_bag copies a table that is not contiguous, so never a column slice)
    table = gate_up_t.reshape(experts_count * hidden * 2, width)
    gate, up = _pair_bags(x.unsqueeze(1).expand(-1, 2, -1), keep, experts, table).unbind(1)  # one call for both
    h = self.act_fn(gate) * up
    keep_down = h.abs() > self.winaconv_tau_down[experts]
    y = _pair_bags(h.unsqueeze(1), keep_down.unsqueeze(1), experts, down_t.reshape(experts_count * width, hidden))[:, 0]
    weighted = y * top_k_weights.reshape(-1, 1)
    return weighted.view(tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def _pair_bags(x: torch.Tensor, keep: torch.Tensor, experts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[pairs, segments, out]: for pair p and segment s, the sum over kept i (keep[p, s, i]) of x[p, s, i] *
    table[(experts[p] * in + i) * segments + s]; every (pair, segment) is one bag of a single embedding_bag call."""
    pairs, segments, in_features = keep.shape
    pair, segment, channel = keep.nonzero(as_tuple=True)  # grouped by pair, then segment
    counts = torch.bincount(pair * segments + segment, minlength=pairs * segments)
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    rows = (experts[pair] * in_features + channel) * segments + segment
    out = F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=x[pair, segment, channel])
    return out.view(pairs, segments, -1)
