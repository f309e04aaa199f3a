"""Top-k routing of a mixture-of-experts layer in one Triton launch.

transformers' routers (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral) compute, per token: logits = x W_router^T, probs =
softmax(logits) in float32, the k largest probs and their expert indices (descending), optionally divided by
their sum, cast back to the logits' dtype (Mixtral keeps float32). On a GPU at decode that is six or more small
launches per layer (softmax, a sort-based top-k, a gather, a sum, a division, a cast), each a few microseconds
for a 128-wide row. `route` does everything after the logits in one launch, one program per token;
`router_and_route` also computes the logits in that launch (decode-sized batches: a cuBLAS GEMV of 128 outputs
keeps few SMs busy, and it is one launch more).

`install(model)` gives every router of a known family this forward on the GPU (and under the Triton
interpreter); elsewhere, and for routers it does not know, the model's own forward runs unchanged. Ties between
equal probabilities go to the lower expert index.

This file is copied into model folders: it imports only torch, triton (optional) and its neighbours.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .kernels import HAS_TRITON, _interpreting, opaque_op, reduction_tickets

if HAS_TRITON:
    import triton
    import triton.language as tl

_OP_VERSION = 1  # of both ops

# Router classes whose forward is the rule above: does it divide by the top-k sum (an attribute name, or True
# for always), and does it cast the scores back to the logits' dtype.
_ROUTERS = {
    "Qwen3MoeTopKRouter": ("norm_topk_prob", True),
    "Qwen2MoeTopKRouter": ("norm_topk_prob", True),
    "OlmoeTopKRouter": ("norm_topk_prob", True),
    "MixtralTopKRouter": (True, False),
}


def route_reference(logits: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule in plain torch, in float64: (top-k probabilities [T, k], their expert indices [T, k])."""
    probs = logits.double().softmax(-1)
    values, indices = probs.topk(top_k, dim=-1)
    if normalize:
        values = values / values.sum(-1, keepdim=True)
    return values, indices


if HAS_TRITON:
    from .kernels import take_ticket

    @triton.jit
    def _store_top_k(logits, experts, valid, scores_ptr, index_ptr,
                     TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, NORMALIZE: tl.constexpr):
        """softmax of one row of float32 logits (-inf where not valid), then its k largest probabilities and their
        experts, stored at scores_ptr / index_ptr."""
        weights = tl.exp(logits - tl.max(logits, axis=0))  # padded experts: exp(-inf) = 0
        probs = weights / tl.sum(weights, axis=0)
        remaining = tl.where(valid, probs, -1.0)  # probabilities are >= 0: padding is never chosen
        slots = tl.arange(0, K_PAD)
        chosen = tl.zeros((K_PAD,), dtype=tl.float32)
        chosen_at = tl.zeros((K_PAD,), dtype=tl.int32)
        for j in tl.static_range(TOP_K):  # k passes of max + argmax over one register-resident row
            best = tl.max(remaining, axis=0)
            at = tl.min(tl.where(remaining == best, experts, E_PAD), axis=0)  # lowest index among ties
            chosen = tl.where(slots == j, best, chosen)
            chosen_at = tl.where(slots == j, at, chosen_at)
            remaining = tl.where(experts == at, -2.0, remaining)
        if NORMALIZE:
            chosen = chosen / tl.sum(chosen, axis=0)  # unused slots hold 0
        in_k = slots < TOP_K
        tl.store(scores_ptr + slots, chosen.to(scores_ptr.dtype.element_ty), mask=in_k)
        tl.store(index_ptr + slots, chosen_at.to(tl.int64), mask=in_k)

    @triton.jit
    def _route_kernel(
        logits_ptr, scores_ptr, index_ptr, n_experts, stride_l, stride_s, stride_i,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, NORMALIZE: tl.constexpr,
    ):
        row = tl.program_id(0)
        experts = tl.arange(0, E_PAD)
        valid = experts < n_experts
        logits = tl.load(logits_ptr + row * stride_l + experts, mask=valid, other=float("-inf")).to(tl.float32)
        _store_top_k(logits, experts, valid, scores_ptr + row * stride_s, index_ptr + row * stride_i,
                     TOP_K, K_PAD, E_PAD, NORMALIZE)

    @triton.jit
    def _router_route_kernel(
        x_ptr, w_ptr, partials_ptr, tickets_ptr, logits_ptr, scores_ptr, index_ptr,
        n_experts, hidden, stride_x, stride_w, stride_p, stride_l, stride_s, stride_i,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, NORMALIZE: tl.constexpr,
        BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, SPLITS: tl.constexpr,
    ):
        """Program (block, row): BLOCK_E router rows x one BLOCK_H chunk of the hidden size for token `row`; its
        float32 partial goes to partials[row, chunk]. The token's last program (ticket) sums the chunks in order,
        stores the logits in their dtype and routes from them (rounded, as transformers routes from F.linear's
        output)."""
        block = tl.program_id(0)
        row = tl.program_id(1)
        chunk = block % SPLITS
        rows = (block // SPLITS) * BLOCK_E + tl.arange(0, BLOCK_E)
        columns = chunk * BLOCK_H + tl.arange(0, BLOCK_H)
        row_mask, column_mask = rows < n_experts, columns < hidden
        xv = tl.load(x_ptr + row * stride_x + columns, mask=column_mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_w + columns[None, :], mask=row_mask[:, None] & column_mask[None, :],
                    other=0.0)
        partial = tl.sum(w.to(tl.float32) * xv[None, :], axis=1)
        token_partials = partials_ptr + row * stride_p
        tl.store(token_partials + chunk * E_PAD + rows, partial, mask=row_mask)
        if take_ticket(tickets_ptr, row, tl.num_programs(0)):
            experts = tl.arange(0, E_PAD)
            valid = experts < n_experts
            total = tl.zeros((E_PAD,), dtype=tl.float32)
            for c in tl.static_range(SPLITS):
                total += tl.load(token_partials + c * E_PAD + experts, mask=valid, other=0.0, cache_modifier=".cg")
            rounded = total.to(logits_ptr.dtype.element_ty)
            tl.store(logits_ptr + row * stride_l + experts, rounded, mask=valid)
            logits = tl.where(valid, rounded.to(tl.float32), float("-inf"))
            _store_top_k(logits, experts, valid, scores_ptr + row * stride_s, index_ptr + row * stride_i,
                         TOP_K, K_PAD, E_PAD, NORMALIZE)
            tl.atomic_xchg(tickets_ptr + row, 0)


def _route_call(logits: torch.Tensor, top_k: int, normalize: bool,
                scores_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rows, n_experts = logits.shape
    scores = torch.empty((rows, top_k), dtype=scores_dtype, device=logits.device)
    indices = torch.empty((rows, top_k), dtype=torch.int64, device=logits.device)
    if rows:
        _route_kernel[(rows,)](
            logits, scores, indices, n_experts, logits.stride(0), scores.stride(0), indices.stride(0),
            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=triton.next_power_of_2(n_experts),
            NORMALIZE=normalize, num_warps=1 if n_experts <= 256 else 4,
        )
    return scores, indices


def _route_fake(logits, top_k, normalize, scores_dtype):
    rows = logits.shape[0]
    return (logits.new_empty((rows, top_k), dtype=scores_dtype),
            logits.new_empty((rows, top_k), dtype=torch.int64))


_op = opaque_op(f"expert_route_v{_OP_VERSION}", _route_call, _route_fake) if HAS_TRITON else None


ROUTER_BLOCK_E, ROUTER_BLOCK_H = 16, 256
FUSED_MAX_TOKENS = 8  # decode-sized batches: the router's product joins the routing launch


def _router_route_call(x: torch.Tensor, weight: torch.Tensor, top_k: int, normalize: bool,
                       scores_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, hidden = x.shape
    n_experts = weight.shape[0]
    e_pad, splits = triton.next_power_of_2(n_experts), triton.cdiv(hidden, ROUTER_BLOCK_H)
    logits = torch.empty((rows, n_experts), dtype=x.dtype, device=x.device)
    scores = torch.empty((rows, top_k), dtype=scores_dtype, device=x.device)
    indices = torch.empty((rows, top_k), dtype=torch.int64, device=x.device)
    partials = torch.empty((rows, splits * e_pad), dtype=torch.float32, device=x.device)
    if rows:
        tickets = reduction_tickets(x.device, rows)
        grid = (triton.cdiv(n_experts, ROUTER_BLOCK_E) * splits, rows)
        _router_route_kernel[grid](
            x, weight, partials, tickets, logits, scores, indices, n_experts, hidden, x.stride(0), weight.stride(0),
            partials.stride(0), logits.stride(0), scores.stride(0), indices.stride(0),
            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, NORMALIZE=normalize,
            BLOCK_E=ROUTER_BLOCK_E, BLOCK_H=ROUTER_BLOCK_H, SPLITS=splits, num_warps=4,
        )
    return logits, scores, indices


def _router_route_fake(x, weight, top_k, normalize, scores_dtype):
    rows = x.shape[0]
    return (x.new_empty((rows, weight.shape[0])), x.new_empty((rows, top_k), dtype=scores_dtype),
            x.new_empty((rows, top_k), dtype=torch.int64))


_router_op = (opaque_op(f"expert_router_route_v{_OP_VERSION}", _router_route_call, _router_route_fake)
              if HAS_TRITON else None)


def router_and_route(x: torch.Tensor, weight: torch.Tensor, top_k: int, normalize: bool,
                     scores_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H], the router's weight [E, H] -> (logits [T, E] in x's dtype, scores, indices) as `route` gives
    them from F.linear(x, weight), in one launch: split over experts and the hidden size so that a decode
    step's one token still spreads the router's bytes over many SMs, the chunks summed in a fixed order."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or not 0 < top_k <= weight.shape[0]:
        raise ValueError(f"router_and_route needs x [T, H], weight [E, H] and 0 < top_k <= E; got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}, top_k={top_k}")
    return _router_op(x.contiguous(), weight.contiguous(), top_k, normalize, scores_dtype or x.dtype)


def route(logits: torch.Tensor, top_k: int, normalize: bool,
          scores_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (scores [T, top_k] in scores_dtype (default: the logits'), indices [T, top_k] int64),
    the k most probable experts of each token in descending order."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if logits.dim() != 2 or not 0 < top_k <= logits.shape[1]:
        raise ValueError(f"route needs logits [T, E] and 0 < top_k <= E; got {tuple(logits.shape)}, top_k={top_k}")
    return _op(logits.contiguous(), top_k, normalize, scores_dtype or logits.dtype)


def _routing_forward(self, hidden_states: torch.Tensor):
    """A router's forward with `route` after its logits on the GPU; the original forward elsewhere."""
    if not (hidden_states.is_cuda or _interpreting()):
        return self.winaconv_original_forward(hidden_states)
    normalize_from, cast = _ROUTERS[type(self).__name__]
    normalize = normalize_from is True or bool(getattr(self, normalize_from))
    x = hidden_states.reshape(-1, self.weight.shape[1])
    scores_dtype = x.dtype if cast else torch.float32
    if x.shape[0] <= FUSED_MAX_TOKENS:
        return router_and_route(x, self.weight, self.top_k, normalize, scores_dtype)
    router_logits = F.linear(x, self.weight)
    scores, indices = route(router_logits, self.top_k, normalize, scores_dtype)
    return router_logits, scores, indices


def install(model) -> int:
    """Give every router of a known family the one-launch routing; returns how many now have it."""
    if not HAS_TRITON:
        return 0
    count = 0
    for module in model.modules():
        if type(module).__name__ not in _ROUTERS:
            continue
        if not hasattr(module, "winaconv_original_forward"):
            module.winaconv_original_forward = module.forward
            module.forward = types.MethodType(_routing_forward, module)
        count += 1
    return count
