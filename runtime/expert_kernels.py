"""Triton kernels for the routed experts at decode: one launch for every (token, routed expert) pair's gate/up
product, one for its down product, reading only the rows of W^T whose input channel the pair keeps. Each launch
splits a pair's input rows into chunks (ExpertTiles) and returns the chunks' partial sums, which the caller adds.

A pair p = (token t, expert e = top_k_index[t, k]) computes, for each output column n of its expert,
    y[p, n] = sum over kept i of x[row(p), i] * W^T[e, i, n],   kept <=> |x[row(p), i]| > tau[e, segment(n), i]
where the weights are stored as W^T ([E, in, out], each input channel one contiguous row), a column belongs to
segment 0 below `width` and to segment 1 from there (gate | up), and row(p) = p // top_k for the gate/up launch
(every routed expert reads its token's input) and p for the down launch (each pair reads its own activation).
The expert index is read in the kernel and the grid depends on shapes only: no host sync, so a CUDA graph can
replay it. Repeated experts in a batch are independent pairs. Dropped rows are masked loads: their bytes are
never fetched.
"""

from typing import NamedTuple

import torch

from .kernels import HAS_TRITON, opaque_op

if HAS_TRITON:
    import triton
    import triton.language as tl

_OP_VERSION = 2
MAX_PAIRS = 64  # above this many (token, expert) pairs the masked grouped product is used instead


class ExpertTiles(NamedTuple):
    """One program's share: BLOCK_N output columns x ITERS*BLOCK_K input rows of one pair (split-K: a pair's
    rows are cut into chunks so that a decode step's few pairs still keep every SM busy with loads in flight)."""
    block_n: int = 128
    block_k: int = 32
    iters: int = 8
    num_warps: int = 4

    def splits(self, in_features: int) -> int:
        return -(-in_features // (self.block_k * self.iters))


TILES = ExpertTiles()


if HAS_TRITON:

    @triton.jit
    def _expert_rows_kernel(x_ptr, experts_ptr, w_ptr, tau_ptr, out_ptr, in_features, out_features, width,
                            pairs_per_row, stride_x, stride_we, stride_wk, stride_te, stride_ts, stride_os,
                            ITERS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (pair, n, s): the pair's partial product over input chunk s for column block n, written to
        out[s, pair, n-block]; the chunks are summed by the caller (fused into the next elementwise op when
        compiled), so the result does not depend on the order programs finish in."""
        pair = tl.program_id(0)
        chunk = tl.program_id(2)
        expert = tl.load(experts_ptr + pair).to(tl.int64)
        row = pair // pairs_per_row
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < out_features
        second = (cols >= width)[None, :]
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for it in tl.static_range(ITERS):  # unrolled: every chunk's loads can be in flight together
            ks = (chunk * ITERS + it) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = ks < in_features
            x = tl.load(x_ptr + row * stride_x + ks, mask=k_ok, other=0.0).to(tl.float32)
            tau_first = tl.load(tau_ptr + expert * stride_te + ks, mask=k_ok, other=float("inf"))
            tau_second = tl.load(tau_ptr + expert * stride_te + stride_ts + ks, mask=k_ok, other=float("inf"))
            magnitude = tl.abs(x)[:, None]
            keep = tl.where(second, magnitude > tau_second[:, None], magnitude > tau_first[:, None])
            keep = keep & col_ok[None, :] & k_ok[:, None]
            w = tl.load(w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :], mask=keep, other=0.0,
                        eviction_policy="evict_first")
            acc += w.to(tl.float32) * x[:, None]
        tl.store(out_ptr + chunk * stride_os + pair * out_features + cols, tl.sum(acc, axis=0), mask=col_ok)


def launch_expert_rows(x: torch.Tensor, experts: torch.Tensor, weight_t: torch.Tensor, tau: torch.Tensor,
                       width: int, pairs_per_row: int, tiles: ExpertTiles = TILES) -> torch.Tensor:
    """[chunks, pairs, out] float32 partials (sum over dim 0 for the product): each pair's product with its
    expert's kept rows. x [rows, in] (unit stride along in), experts [pairs] int, weight_t [E, in, out] (unit
    stride along out), tau [E, segments, in] float32 with unit stride along in (segment 1 read for columns >=
    width; pass width = out for one segment)."""
    pairs = experts.numel()
    in_features, out_features = weight_t.shape[1], weight_t.shape[2]
    chunks = tiles.splits(in_features)
    out = torch.empty((chunks, pairs, out_features), dtype=torch.float32, device=x.device)
    if pairs == 0:
        return out
    stride_ts = tau.stride(1) if tau.shape[1] > 1 else 0
    grid = (pairs, triton.cdiv(out_features, tiles.block_n), chunks)
    _expert_rows_kernel[grid](x, experts, weight_t, tau, out, in_features, out_features, width, pairs_per_row,
                              x.stride(0), weight_t.stride(0), weight_t.stride(1), tau.stride(0), stride_ts,
                              out.stride(0), ITERS=tiles.iters, BLOCK_K=tiles.block_k, BLOCK_N=tiles.block_n,
                              num_warps=tiles.num_warps)
    return out


def _expert_rows_call(x: torch.Tensor, experts: torch.Tensor, weight_t: torch.Tensor, tau: torch.Tensor,
                      width: int, pairs_per_row: int, block_n: int, block_k: int, iters: int,
                      num_warps: int) -> torch.Tensor:
    return launch_expert_rows(x, experts, weight_t, tau, width, pairs_per_row,
                              ExpertTiles(block_n, block_k, iters, num_warps))


def _expert_rows_fake(x, experts, weight_t, tau, width, pairs_per_row, block_n, block_k, iters, num_warps):
    chunks = ExpertTiles(block_n, block_k, iters, num_warps).splits(weight_t.shape[1])
    return x.new_empty((chunks, experts.numel(), weight_t.shape[2]), dtype=torch.float32)


_op = opaque_op(f"expert_rows_v{_OP_VERSION}", _expert_rows_call, _expert_rows_fake) if HAS_TRITON else None


def grouped_experts_triton(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                           gate_up_t: torch.Tensor, down_t: torch.Tensor, tau_gate_up: torch.Tensor,
                           tau_down: torch.Tensor, activation, tiles: ExpertTiles = TILES) -> torch.Tensor:
    """The routed experts' output [tokens, hidden] for decode: gate/up in one launch, down in one launch.
    gate_up_t [E, H, 2I] and down_t [E, I, H] are W^T views; tau_gate_up [E, 2, H], tau_down [E, I]."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    tokens, top_k = top_k_index.shape
    width = down_t.shape[1]
    experts = top_k_index.reshape(-1).contiguous()
    x = x.contiguous()
    gate_up = _op(x, experts, gate_up_t, tau_gate_up, width, top_k, *tiles).sum(dim=0)
    hidden = (activation(gate_up[:, :width]) * gate_up[:, width:]).to(x.dtype)
    down = _op(hidden, experts, down_t, tau_down.unsqueeze(1), down_t.shape[2], 1, *tiles).sum(dim=0)
    weighted = down * top_k_weights.reshape(-1, 1).float()
    return weighted.view(tokens, top_k, -1).sum(dim=1).to(x.dtype)


def use_expert_kernel(tensor: torch.Tensor, pairs: int) -> bool:
    """Decode-sized batches on the GPU (tests call grouped_experts_triton directly under the interpreter)."""
    return HAS_TRITON and tensor.is_cuda and pairs <= MAX_PAIRS

