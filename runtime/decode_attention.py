"""Single-token attention over a static KV cache: a Triton kernel behind transformers' attention interface.

At decode each layer attends one query token to the whole static cache. transformers' sdpa path repeats the
key/value heads for grouped-query attention and calls a general fused kernel with a [batch, 1, 1, cache] mask;
this module's kernel reads each key/value head once for all the query heads that share it and splits the cache
length over programs so that a batch-1 step fills the GPU:

  1. program (b, g, s) takes query heads g*G .. g*G+G-1 (G = heads per key/value head) of row b and the cache
     slice s; it keeps a running max, sum and weighted value sum (online softmax, base 2) over the slice's
     positions that the mask keeps (masked positions are never loaded) and stores them as fp32 partials;
  2. a second launch combines the slices of each (b, head) in slice order (deterministic, no atomics).

IMPLEMENTATION ("winaconv_sdpa") is sdpa with this kernel for one query token on a GPU; every other call --
prefill, the CPU, soft-capped logits, attention sinks, masks that differ per head -- goes to transformers'
sdpa unchanged. `install(model)` switches a model that uses sdpa to it (the decode engine does this on a GPU).

This file is copied into model folders: it imports only torch, transformers, triton (optional) and its
neighbours.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .kernels import HAS_TRITON, _interpreting, opaque_op

if HAS_TRITON:
    import triton
    import triton.language as tl

IMPLEMENTATION = "winaconv_sdpa"
_OP_VERSION = 1
_LOG2E = 1.4426950408889634
_MASK_NONE, _MASK_BOOL, _MASK_ADDITIVE = 0, 1, 2


def decode_attention_reference(query, key, value, mask, scale: float) -> torch.Tensor:
    """The rule in plain torch, in float64: query [B, H, 1, D], key/value [B, KVH, L, D], mask None or
    [B or 1, 1, 1, L] (bool: True attends; float: added to the scores). Returns [B, 1, H, D] float64."""
    batch, heads, _, dim = query.shape
    group = heads // key.shape[1]
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scores = (query.double() @ k.transpose(-1, -2)) * scale  # [B, H, 1, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)


if HAS_TRITON:

    @triton.jit
    def _decode_attention_partial_kernel(
        q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, ml_ptr,
        L, per_split, scale_log2,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
        stride_mb, stride_ml, stride_ob, stride_oh, stride_os, stride_mlb, stride_mlh, stride_mls,
        KV_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        MASK_KIND: tl.constexpr, IEEE: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        pid_bg = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bg // KV_HEADS
        g = pid_bg % KV_HEADS
        rows = tl.arange(0, G_PAD)
        heads = g * GROUP + rows
        row_ok = rows < GROUP
        dd = tl.arange(0, D_PAD)
        d_ok = dd < D
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dd[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + b * stride_kb + g * stride_kh
        v_base = v_ptr + b * stride_vb + g * stride_vh
        running_max = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((G_PAD,), dtype=tl.float32)
        acc = tl.zeros((G_PAD, D_PAD), dtype=tl.float32)
        start = split * per_split
        for offset in range(0, per_split, BLOCK_L):
            ls = start + offset + tl.arange(0, BLOCK_L)
            keep = ls < L
            if MASK_KIND == 1:
                keep = keep & (tl.load(mask_ptr + b * stride_mb + ls * stride_ml, mask=keep, other=0) != 0)
            kv_mask = keep[:, None] & d_ok[None, :]
            k = tl.load(k_base + ls[:, None] * stride_kl + dd[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + ls[:, None] * stride_vl + dd[None, :], mask=kv_mask, other=0.0)
            if IEEE:  # float32/float64 inputs, or the CPU interpreter (its bf16 dot is unreliable)
                scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            scores = scores * scale_log2
            if MASK_KIND == 2:
                scores += tl.load(mask_ptr + b * stride_mb + ls * stride_ml, mask=keep, other=0.0).to(tl.float32)[None, :] * 1.4426950408889634
            scores = tl.where(keep[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing kept yet: no inf - inf
            alpha = tl.exp2(running_max - safe_max)
            p = tl.exp2(scores - safe_max[:, None])
            running_sum = running_sum * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            running_max = new_max
        out_mask = row_ok[:, None] & d_ok[None, :]
        tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + dd[None, :], acc,
                 mask=out_mask)
        ml = ml_ptr + b * stride_mlb + heads * stride_mlh + split * stride_mls
        tl.store(ml, running_max, mask=row_ok)
        tl.store(ml + 1, running_sum, mask=row_ok)

    @triton.jit
    def _decode_attention_combine_kernel(
        o_ptr, ml_ptr, out_ptr, n_split, HEADS,
        stride_ob, stride_oh, stride_os, stride_mlb, stride_mlh, stride_mls, stride_outb, stride_outh,
        D: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // HEADS
        h = pid % HEADS
        ss = tl.arange(0, S_PAD)
        s_ok = ss < n_split
        dd = tl.arange(0, D_PAD)
        ml = ml_ptr + b * stride_mlb + h * stride_mlh + ss * stride_mls
        maxes = tl.load(ml, mask=s_ok, other=float("-inf"))
        sums = tl.load(ml + 1, mask=s_ok, other=0.0)
        top = tl.max(maxes, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        weights = tl.exp2(maxes - top)  # empty slices (max -inf) weigh 0
        parts = tl.load(o_ptr + b * stride_ob + h * stride_oh + ss[:, None] * stride_os + dd[None, :],
                        mask=s_ok[:, None] & (dd < D)[None, :], other=0.0)
        out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
        tl.store(out_ptr + b * stride_outb + h * stride_outh + dd, out.to(out_ptr.dtype.element_ty), mask=dd < D)


def _splits(batch_kv_heads: int, length: int, block_l: int, device) -> int:
    """Cache slices per (row, key/value head): about two programs per SM, each at least one block long."""
    if _interpreting() or device.type != "cuda":
        return max(1, min(3, triton.cdiv(length, block_l)))  # several slices: the combine is exercised
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, batch_kv_heads), triton.cdiv(length, block_l)))


def _decode_attention_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                           scale: float) -> torch.Tensor:
    batch, heads, _, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = heads // kv_heads
    block_l = 32 if dim <= 128 else 16
    n_split = _splits(batch * kv_heads, length, block_l, query.device)
    per_split = triton.cdiv(triton.cdiv(length, n_split), block_l) * block_l
    n_split = triton.cdiv(length, per_split)
    d_pad = max(16, triton.next_power_of_2(dim))  # tl.dot needs 16 along every dimension
    partial = torch.empty((batch, heads, n_split, d_pad), device=query.device, dtype=torch.float32)
    max_sum = torch.empty((batch, heads, n_split, 2), device=query.device, dtype=torch.float32)
    out = torch.empty((batch, 1, heads, dim), device=query.device, dtype=query.dtype)
    if mask is None:
        kind, mask_arg, stride_mb, stride_ml = _MASK_NONE, query, 0, 0
    else:
        mask_arg = mask[:, 0, 0, :]  # [B or 1, L]
        kind = _MASK_BOOL if mask.dtype == torch.bool else _MASK_ADDITIVE
        stride_mb = mask_arg.stride(0) if mask_arg.shape[0] > 1 else 0
        stride_ml = mask_arg.stride(1)
    ieee = query.dtype in (torch.float32, torch.float64) or _interpreting()
    _decode_attention_partial_kernel[(batch * kv_heads, n_split)](
        query, key, value, mask_arg, partial, max_sum,
        length, per_split, scale * _LOG2E,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), stride_mb, stride_ml,
        partial.stride(0), partial.stride(1), partial.stride(2), max_sum.stride(0), max_sum.stride(1), max_sum.stride(2),
        KV_HEADS=kv_heads, GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), D=dim, D_PAD=d_pad,
        MASK_KIND=kind, IEEE=ieee, BLOCK_L=block_l, num_warps=4)
    _decode_attention_combine_kernel[(batch * heads,)](
        partial, max_sum, out, n_split, heads,
        partial.stride(0), partial.stride(1), partial.stride(2), max_sum.stride(0), max_sum.stride(1), max_sum.stride(2),
        out.stride(0), out.stride(2), D=dim, D_PAD=d_pad, S_PAD=triton.next_power_of_2(n_split), num_warps=4)
    return out


def _decode_attention_fake(query, key, value, mask, scale):
    return query.new_empty((query.shape[0], 1, query.shape[1], query.shape[3]))


_op = opaque_op(f"decode_attention_v{_OP_VERSION}", _decode_attention_call, _decode_attention_fake) if HAS_TRITON else None


def decode_attention(query, key, value, mask=None, scale: float | None = None) -> torch.Tensor:
    """One query token against the cache: query [B, H, 1, D], key/value [B, KVH, L, D] (H a multiple of KVH),
    mask None or [B or 1, 1, 1, L] (bool or additive). Returns [B, 1, H, D] in query's dtype."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if query.dim() != 4 or query.shape[2] != 1 or not _heads_fit(query, key, value):
        raise ValueError(f"decode_attention needs query [B, H, 1, D] and key = value [B, KVH, L, D] with KVH "
                         f"dividing H; got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    return _op(query, key, value, mask, scale)


def _heads_fit(query, key, value) -> bool:
    """key and value alike, and the query heads a whole number of groups per key/value head."""
    return key.shape == value.shape and query.shape[1] % key.shape[1] == 0


def handles(query, key, value, mask, kwargs) -> bool:
    """True where the kernel computes exactly what transformers' sdpa path would."""
    if query.shape[2] != 1 or not (query.is_cuda or _interpreting()) or not HAS_TRITON:
        return False
    if not _heads_fit(query, key, value) or query.shape[-1] > 256:
        return False
    if any(kwargs.get(name) is not None for name in ("softcap", "s_aux", "sinks", "position_bias")):
        return False
    if kwargs.get("output_attentions") or kwargs.get("dropout", 0.0):
        return False
    return mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1
                            and mask.shape[0] in (1, query.shape[0]) and mask.shape[3] == key.shape[2])


def decode_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """transformers' attention-function signature: the kernel for one query token, sdpa otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not handles(query, key, value, attention_mask, dict(kwargs, dropout=dropout)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return decode_attention(query, key, value, attention_mask, scaling), None


def register() -> None:
    """Make IMPLEMENTATION a valid attn_implementation, with sdpa's masks (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, decode_sdpa_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def install(model) -> bool:
    """Switch a model that attends with sdpa to IMPLEMENTATION; True if it now uses it."""
    if not HAS_TRITON or getattr(model.config, "_attn_implementation", None) not in ("sdpa", IMPLEMENTATION):
        return False
    register()
    if model.config._attn_implementation != IMPLEMENTATION:
        model.set_attn_implementation(IMPLEMENTATION)
    return model.config._attn_implementation == IMPLEMENTATION
