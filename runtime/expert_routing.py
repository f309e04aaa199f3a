"""Top-k routing of a mixture-of-experts layer in one Triton launch.

transformers' routers (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral) compute, per token: logits = x W_router^T, probs =
softmax(logits) in float32, the k largest probs and their expert indices (descending), optionally divided by
their sum, cast back to the logits' dtype (Mixtral keeps float32). On a GPU at decode that is six or more small
launches per layer (softmax, a sort-based top-k, a gather, a sum, a division, a cast), each a few microseconds
for a 128-wide row. `route` does everything after the logits in one launch, one program per token.

`install(model)` gives every router of a known family this forward on the GPU (and under the Triton
interpreter); elsewhere, and for routers it does not know, the model's own forward runs unchanged. Ties between
equal probabilities go to the lower expert index.

This file is copied into model folders: it imports only torch, triton (optional) and its neighbours.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .kernels import HAS_TRITON, _interpreting, opaque_op

if HAS_TRITON:
    import triton
    import triton.language as tl

_OP_VERSION = 1

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

    @triton.jit
    def _route_kernel(
        logits_ptr, scores_ptr, index_ptr, n_experts, stride_l, stride_s, stride_i,
        TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr, NORMALIZE: tl.constexpr,
    ):
        row = tl.program_id(0)
        experts = tl.arange(0, E_PAD)
        valid = experts < n_experts
        logits = tl.load(logits_ptr + row * stride_l + experts, mask=valid, other=float("-inf")).to(tl.float32)
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
        tl.store(scores_ptr + row * stride_s + slots, chosen.to(scores_ptr.dtype.element_ty), mask=in_k)
        tl.store(index_ptr + row * stride_i + slots, chosen_at.to(tl.int64), mask=in_k)


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
    router_logits = F.linear(hidden_states.reshape(-1, self.weight.shape[1]), self.weight)
    scores, indices = route(router_logits, self.top_k, normalize,
                            router_logits.dtype if cast else torch.float32)
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
