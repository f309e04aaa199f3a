"""Triton kernels for the routed experts at decode: one launch for every (token, routed expert) pair's gate/up
product and SiLU(gate) * up, one for the down product weighted and summed over each token's routed experts,
reading only the rows of W^T whose input channel the pair keeps.

A pair p = (token t, expert e = top_k_index[t, k]), p = t * top_k + k, computes
    gate/up:  g[p, n] = sum over kept i of x[t, i] * W^T[e, i, n]           kept <=> |x[t, i]| > tau[e, 0, i]
              u[p, n] = sum over kept i of x[t, i] * W^T[e, i, width + n]   kept <=> |x[t, i]| > tau[e, 1, i]
              h[p, n] = silu(g[p, n]) * u[p, n]
    down:     y[t, n] = sum over k of weight[t, k] * sum over kept j of h[p, j] * D^T[e, j, n],
              kept <=> |h[p, j]| > tau_down[e, j]
with the weights stored as W^T ([E, in, out], each input channel one contiguous row). Each launch splits a pair's
input rows into chunks (ExpertTiles: split-K, so that a decode step's few pairs still keep every SM busy with
loads in flight); each program stores its chunk's fp32 partial, and the program that finishes an output block
last (a per-block ticket says so) sums the block's partials in a fixed order (deterministic), applies SiLU * up
(gate/up) or the routing weights (down), stores the result in the input's dtype and resets the ticket. So a
layer's experts take two launches and nothing between them. The expert index is read in the kernel and the grid
depends on shapes only: no host sync, so a CUDA graph can replay it. Repeated experts in a batch are independent
pairs. Dropped rows are masked loads: their bytes are never fetched.
"""

from typing import NamedTuple

import torch

from .kernels import HAS_TRITON, opaque_op, reduction_tickets

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .kernels import take_ticket

_OP_VERSION = 4  # v4: ExpertTiles.apart
MAX_PAIRS = 64  # above this many (token, expert) pairs the masked grouped product is used instead


class ExpertTiles(NamedTuple):
    """One program's share: BLOCK_N output columns x ITERS*BLOCK_K input rows of one pair. In the gate/up launch
    a program reads those columns of gate and of up, or (apart=1) of one of them, half the registers per
    program and twice the programs (the dense linears' kernel treats its segments so)."""
    block_n: int = 32
    block_k: int = 512
    iters: int = 1
    num_warps: int = 4
    apart: int = 0

    def splits(self, in_features: int) -> int:
        return -(-in_features // (self.block_k * self.iters))


TILES = ExpertTiles()
DOWN_TILES: ExpertTiles | None = None  # the down launch's, where they differ from TILES (a benchmark may set them)


if HAS_TRITON:

    @triton.jit
    def _program(experts_ptr, n_columns, BLOCK_N: tl.constexpr):
        """Program (pair, segment * blocks + block, chunk): its pair's expert, its column block and segment (0
        unless the launch gives each segment its own programs) and its output columns (with their bounds mask)."""
        pair = tl.program_id(0)
        blocks = tl.cdiv(n_columns, BLOCK_N)
        block = tl.program_id(1) % blocks
        expert = tl.load(experts_ptr + pair).to(tl.int64)
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        return pair, block, tl.program_id(1) // blocks, tl.program_id(2), expert, cols, cols < n_columns

    @triton.jit
    def _gate_up_kernel(x_ptr, experts_ptr, w_ptr, tau_ptr, ws_ptr, tickets_ptr, h_ptr,
                        in_features, width, top_k,
                        stride_x, stride_we, stride_wk, stride_te, stride_ts, stride_wsc, stride_wsp, stride_h,
                        ITERS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, APART: tl.constexpr):
        """Program (pair, n, chunk): gate and up columns n*BLOCK_N.. over input chunk `chunk` (APART: n counts
        the gate blocks, then the up blocks, and a program reads one of them); the block's last program stores
        h = silu(gate) * up."""
        pair, block, segment, chunk, expert, cols, col_ok = _program(experts_ptr, width, BLOCK_N)
        tau = tau_ptr + expert * stride_te
        rows = w_ptr + expert * stride_we
        acc_gate = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for it in tl.static_range(ITERS):  # unrolled: every chunk's loads can be in flight together
            ks = (chunk * ITERS + it) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = ks < in_features
            x = tl.load(x_ptr + (pair // top_k) * stride_x + ks, mask=k_ok, other=0.0).to(tl.float32)
            magnitude = tl.abs(x)
            if APART:  # acc_gate holds this program's segment
                keep = magnitude > tl.load(tau + segment * stride_ts + ks, mask=k_ok, other=float("inf"))
                w = rows + ks[:, None] * stride_wk + segment * width + cols[None, :]
                part = tl.load(w, mask=keep[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
                acc_gate += part.to(tl.float32) * x[:, None]
            else:
                keep_gate = magnitude > tl.load(tau + ks, mask=k_ok, other=float("inf"))
                keep_up = magnitude > tl.load(tau + stride_ts + ks, mask=k_ok, other=float("inf"))
                w = rows + ks[:, None] * stride_wk + cols[None, :]
                gate = tl.load(w, mask=keep_gate[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
                up = tl.load(w + width, mask=keep_up[:, None] & col_ok[None, :], other=0.0,
                             eviction_policy="evict_first")
                acc_gate += gate.to(tl.float32) * x[:, None]
                acc_up += up.to(tl.float32) * x[:, None]
        partial = ws_ptr + pair * stride_wsp + cols
        if APART:
            tl.store(partial + chunk * stride_wsc + segment * width, tl.sum(acc_gate, axis=0), mask=col_ok)
        else:
            tl.store(partial + chunk * stride_wsc, tl.sum(acc_gate, axis=0), mask=col_ok)
            tl.store(partial + chunk * stride_wsc + width, tl.sum(acc_up, axis=0), mask=col_ok)
        ticket = pair * tl.cdiv(width, BLOCK_N) + block
        if take_ticket(tickets_ptr, ticket, tl.num_programs(2) * (2 if APART else 1)):
            gate_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
            up_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
            for c in range(0, tl.num_programs(2)):  # chunk order: deterministic
                gate_sum += tl.load(partial + c * stride_wsc, mask=col_ok, other=0.0, cache_modifier=".cg")
                up_sum += tl.load(partial + c * stride_wsc + width, mask=col_ok, other=0.0, cache_modifier=".cg")
            hidden = gate_sum / (1.0 + tl.exp(-gate_sum)) * up_sum
            tl.store(h_ptr + pair * stride_h + cols, hidden.to(h_ptr.dtype.element_ty), mask=col_ok)
            tl.atomic_xchg(tickets_ptr + ticket, 0)

    @triton.jit
    def _down_kernel(h_ptr, experts_ptr, routing_ptr, w_ptr, tau_ptr, ws_ptr, tickets_ptr, y_ptr,
                     in_features, out_features, top_k,
                     stride_h, stride_we, stride_wk, stride_te, stride_wsc, stride_wsp, stride_y,
                     ITERS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (pair, n, chunk): the pair's down partial for columns n*BLOCK_N.. over chunk `chunk`; the
        last program of the token's block (top_k pairs x chunks) stores y = sum_k weight_k * down_k."""
        pair, block, _, chunk, expert, cols, col_ok = _program(experts_ptr, out_features, BLOCK_N)
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for it in tl.static_range(ITERS):
            ks = (chunk * ITERS + it) * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = ks < in_features
            h = tl.load(h_ptr + pair * stride_h + ks, mask=k_ok, other=0.0).to(tl.float32)
            keep = tl.abs(h) > tl.load(tau_ptr + expert * stride_te + ks, mask=k_ok, other=float("inf"))
            w = tl.load(w_ptr + expert * stride_we + ks[:, None] * stride_wk + cols[None, :],
                        mask=keep[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
            acc += w.to(tl.float32) * h[:, None]
        tl.store(ws_ptr + chunk * stride_wsc + pair * stride_wsp + cols, tl.sum(acc, axis=0), mask=col_ok)
        token = pair // top_k
        ticket = token * tl.num_programs(1) + block
        chunks = tl.num_programs(2)
        if take_ticket(tickets_ptr, ticket, top_k * chunks):
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k in range(0, top_k):  # routed-expert order, then chunk order: deterministic
                routed = token * top_k + k
                down = tl.zeros([BLOCK_N], dtype=tl.float32)
                for c in range(0, chunks):
                    down += tl.load(ws_ptr + c * stride_wsc + routed * stride_wsp + cols, mask=col_ok, other=0.0,
                                    cache_modifier=".cg")
                total += down * tl.load(routing_ptr + routed).to(tl.float32)
            tl.store(y_ptr + token * stride_y + cols, total.to(y_ptr.dtype.element_ty), mask=col_ok)
            tl.atomic_xchg(tickets_ptr + ticket, 0)


def launch_gate_up(x: torch.Tensor, experts: torch.Tensor, gate_up_t: torch.Tensor, tau: torch.Tensor,
                   top_k: int, tiles: ExpertTiles = TILES) -> torch.Tensor:
    """h [pairs, width] in x's dtype: silu(gate) * up of every pair. x [tokens, H] (unit stride along H),
    experts [pairs] int (pair p reads x[p // top_k]), gate_up_t [E, H, 2 * width] (unit stride along the last
    dimension), tau [E, 2, H] float32 (unit stride along H; gate row, then up row)."""
    pairs = experts.numel()
    in_features, width = gate_up_t.shape[1], gate_up_t.shape[2] // 2
    chunks = tiles.splits(in_features)
    hidden = torch.empty((pairs, width), dtype=x.dtype, device=x.device)
    if pairs == 0:
        return hidden
    blocks = triton.cdiv(width, tiles.block_n)
    tickets = reduction_tickets(x.device, pairs * blocks)
    partials = torch.empty((chunks, pairs, 2 * width), dtype=torch.float32, device=x.device)
    _gate_up_kernel[(pairs, blocks * (2 if tiles.apart else 1), chunks)](
        x, experts, gate_up_t, tau, partials, tickets, hidden, in_features, width, top_k,
        x.stride(0), gate_up_t.stride(0), gate_up_t.stride(1), tau.stride(0), tau.stride(1), partials.stride(0),
        partials.stride(1), hidden.stride(0),
        ITERS=tiles.iters, BLOCK_K=tiles.block_k, BLOCK_N=tiles.block_n, APART=bool(tiles.apart),
        num_warps=tiles.num_warps)
    return hidden


def launch_down(hidden: torch.Tensor, experts: torch.Tensor, routing_weights: torch.Tensor, down_t: torch.Tensor,
                tau: torch.Tensor, top_k: int, tiles: ExpertTiles = TILES) -> torch.Tensor:
    """y [tokens, H] in hidden's dtype: each token's down products weighted by routing_weights [tokens * top_k]
    and summed. hidden [pairs, width], down_t [E, width, H] (unit stride along H), tau [E, width] float32."""
    pairs = experts.numel()
    in_features, out_features = down_t.shape[1], down_t.shape[2]
    chunks = tiles.splits(in_features)
    tokens = pairs // top_k
    y = torch.empty((tokens, out_features), dtype=hidden.dtype, device=hidden.device)
    if pairs == 0:
        return y
    blocks = triton.cdiv(out_features, tiles.block_n)
    tickets = reduction_tickets(hidden.device, tokens * blocks)
    partials = torch.empty((chunks, pairs, out_features), dtype=torch.float32, device=hidden.device)
    _down_kernel[(pairs, blocks, chunks)](
        hidden, experts, routing_weights, down_t, tau, partials, tickets, y, in_features, out_features, top_k,
        hidden.stride(0), down_t.stride(0), down_t.stride(1), tau.stride(0), partials.stride(0), partials.stride(1),
        y.stride(0),
        ITERS=tiles.iters, BLOCK_K=tiles.block_k, BLOCK_N=tiles.block_n, num_warps=tiles.num_warps)
    return y


def _gate_up_call(x: torch.Tensor, experts: torch.Tensor, gate_up_t: torch.Tensor, tau: torch.Tensor, top_k: int,
                  block_n: int, block_k: int, iters: int, num_warps: int, apart: int) -> torch.Tensor:
    return launch_gate_up(x, experts, gate_up_t, tau, top_k, ExpertTiles(block_n, block_k, iters, num_warps, apart))


def _gate_up_fake(x, experts, gate_up_t, tau, top_k, block_n, block_k, iters, num_warps, apart):
    return x.new_empty((experts.numel(), gate_up_t.shape[2] // 2))


def _down_call(hidden: torch.Tensor, experts: torch.Tensor, routing_weights: torch.Tensor, down_t: torch.Tensor,
               tau: torch.Tensor, top_k: int, block_n: int, block_k: int, iters: int,
               num_warps: int, apart: int) -> torch.Tensor:
    return launch_down(hidden, experts, routing_weights, down_t, tau, top_k,
                       ExpertTiles(block_n, block_k, iters, num_warps, apart))


def _down_fake(hidden, experts, routing_weights, down_t, tau, top_k, block_n, block_k, iters, num_warps, apart):
    return hidden.new_empty((experts.numel() // top_k, down_t.shape[2]))


_gate_up_op = opaque_op(f"expert_gate_up_v{_OP_VERSION}", _gate_up_call, _gate_up_fake) if HAS_TRITON else None
_down_op = opaque_op(f"expert_down_v{_OP_VERSION}", _down_call, _down_fake) if HAS_TRITON else None


def is_silu(activation) -> bool:
    """The kernels apply SiLU themselves (every supported MoE family's experts use it)."""
    return activation is torch.nn.functional.silu or type(activation).__name__ in ("SiLU", "SiLUActivation")


def grouped_experts_triton(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                           gate_up_t: torch.Tensor, down_t: torch.Tensor, tau_gate_up: torch.Tensor,
                           tau_down: torch.Tensor, activation, tiles: ExpertTiles | None = None,
                           down_tiles: ExpertTiles | None = None) -> torch.Tensor:
    """The routed experts' output [tokens, hidden] for decode: gate/up in one launch, down in one launch.
    gate_up_t [E, H, 2I] and down_t [E, I, H] are W^T views; tau_gate_up [E, 2, H], tau_down [E, I];
    activation must be SiLU (is_silu). Without tiles, the module's TILES and DOWN_TILES as they are at the call
    (a benchmark may set them before building a model); tiles alone serve both launches."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed")
    if not is_silu(activation):
        raise ValueError(f"the grouped expert kernels apply SiLU; got {activation!r}")
    if tiles is None:
        tiles, down_tiles = TILES, down_tiles or DOWN_TILES
    down_tiles = down_tiles or tiles
    top_k = top_k_index.shape[1]
    experts = top_k_index.reshape(-1).contiguous()
    hidden = _gate_up_op(x.contiguous(), experts, gate_up_t, tau_gate_up, top_k, *tiles)
    return _down_op(hidden, experts, top_k_weights.reshape(-1).contiguous(), down_t, tau_down, top_k, *down_tiles)


def use_expert_kernel(tensor: torch.Tensor, pairs: int, activation) -> bool:
    """Decode-sized batches of SiLU experts on the GPU (tests call grouped_experts_triton directly under the
    interpreter)."""
    return HAS_TRITON and tensor.is_cuda and pairs <= MAX_PAIRS and is_silu(activation)

