"""The CPU's activation-sparse product: read only the rows of W^T whose input channel is kept.

Batch-1 decode on a CPU is bound by memory bandwidth, as on a GPU. With W^T stored row-major, each
input channel is one contiguous row, and
    y[t] = sum over kept i of x[t, i] * W^T[i]
is exactly what torch's embedding_bag computes (indices = kept channels, per_sample_weights = their
values, mode="sum"), with its own vectorised loop over a row and no extra compiled code. embedding_bag
runs one bag per thread, so on larger matrices each token's kept channels are split into one bag per
thread of torch's pool and the partial sums added afterwards (whether that pays is measured: GatherPlan).

Candidates measured on the project's 2-core machine (docs/results.md): index_select + mv
materialises the gathered rows (several times slower than embedding_bag, far more in bf16, where mv is
slow); a torch.compile'd (inductor, dynamic) gather materialises them too (slower still);
embedding_bag is the only one that reads each kept row once and writes nothing else.

Layout: fp32 F.linear is as fast on the transposed layout as on the original one, so fp32 weights are
re-laid as W^T once (one copy serves both paths). bf16 F.linear on the transposed layout is many times
slower on CPUs without native bf16 matmul, so bf16 keeps W for the dense product and adds W^T for the
gather (twice the weight memory, said in the one-line notice).
"""

import math
import os
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .tensor_parallel import local, set_local

# Where the gather beats the masked dense product depends on the machine more than on anything else: on
# one 2-core host the gather streamed kept rows faster per byte than torch's dense GEMV, on another one of
# the same kind it was slower, and small matrices lost there at every sparsity (docs/results.md). So the
# crossover is measured on the machine itself, once per (shape, dtype, threads), at the first decode-sized
# product of that shape: dense F.linear of the masked input against the gather at kept fractions 1/8 .. 1,
# with one bag and one bag per thread, on freshly allocated matrices cycled through more memory than a CPU
# cache holds.
# WINACONV_CPU_GATHER=always / never skips the measurement (tests; comparing the paths).
GATHER_MODE = os.environ.get("WINACONV_CPU_GATHER", "auto")
GATHER_DTYPES = (torch.float32, torch.bfloat16)
GATHER_MAX_TOKENS = 8
MEASURED_FRACTIONS = tuple(k / 8 for k in range(1, 9))
COLD_BYTES = 64 << 20  # per layout: twice a common L3's size


class GatherPlan(NamedTuple):
    max_row_fraction: float  # the gather runs while it reads at most this fraction of one dense pass of rows
    bags: int  # embedding_bag bags per token: 1, or one per thread (partial sums added after)


_plans: dict = {}


def separate_transpose_needed(dtype: torch.dtype) -> bool:
    """Whether the dense product needs W in its original layout (so W^T is an extra copy)."""
    return dtype != torch.float32


def gather_supported(dtype: torch.dtype) -> bool:
    return GATHER_MODE != "never" and (dtype in GATHER_DTYPES or GATHER_MODE == "always")


def gather_may_win(num_tokens: int, in_features: int, out_features: int, dtype: torch.dtype) -> GatherPlan | None:
    """Shape-level part of the policy, decided before the mask is computed: the plan to run the gather with,
    or None where it never runs."""
    if not gather_supported(dtype) or num_tokens > GATHER_MAX_TOKENS:
        return None
    plan = gather_plan(in_features, out_features, dtype)
    return plan if plan.max_row_fraction > 0 else None


def gather_plan(in_features: int, out_features: int, dtype: torch.dtype) -> GatherPlan:
    threads = max(1, torch.get_num_threads())
    if GATHER_MODE == "always":
        return GatherPlan(math.inf, threads)
    key = (in_features, out_features, dtype, threads)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = measure_gather_plan(in_features, out_features, dtype, threads)
    return plan


def crossover(fractions, gather_ms, dense_ms: float) -> float:
    """The largest kept fraction up to which the gather is faster than dense (interpolated between measured
    fractions; 0 if it never is). The gather's time grows with the fraction, so the first loss ends it."""
    best, previous = 0.0, None
    for fraction, ms in zip(fractions, gather_ms):
        if ms >= dense_ms:
            if previous is not None:  # interpolate between the last win and this loss
                f0, m0 = previous
                best = f0 + (fraction - f0) * (dense_ms - m0) / (ms - m0)
            return best
        best, previous = fraction, (fraction, ms)
    return best


@torch.no_grad()
def measure_gather_plan(in_features: int, out_features: int, dtype: torch.dtype, threads: int) -> GatherPlan:
    """Time the masked dense product and the gather on this machine for this shape (see GATHER_MODE)."""
    size = torch.finfo(dtype).bits // 8
    # (at most 128 matrices: a smaller one stays in cache in a real model too, and the loop's cost grows)
    count = min(128, max(2, math.ceil(COLD_BYTES / (in_features * out_features * size))))
    weights_t = [torch.full((in_features, out_features), 0.01, dtype=dtype) for _ in range(count)]
    weights = [w.t().contiguous() for w in weights_t] if separate_transpose_needed(dtype) else [w.t() for w in weights_t]
    x = torch.linspace(-1, 1, in_features, dtype=dtype)[None]
    matrices = list(zip(weights_t, weights))
    tau = torch.full_like(x, 0.5)
    dense = cycled_ms(lambda w_t, w: F.linear(x * (x.abs() > tau), w), matrices)
    curves = {}
    for bags in sorted({1, threads}):
        plan, curve = GatherPlan(1.0, bags), []
        for fraction in MEASURED_FRACTIONS:  # the decode path itself, mask included, `fraction` of the rows kept
            kept_tau = keeping_thresholds(fraction, in_features)[None]
            curve.append(cycled_ms(lambda w_t, w: _one_token_products(x[0], kept_tau, [w_t], plan), matrices))
        curves[bags] = curve
    bags = min(curves, key=lambda b: curves[b][len(MEASURED_FRACTIONS) // 2 - 1])  # the faster at 1/2 kept
    return GatherPlan(crossover(MEASURED_FRACTIONS, curves[bags], dense), bags)


def cycled_ms(call, arguments: list) -> float:
    """Wall ms per call(*args) over the list of argument tuples (cycled through more memory than a cache holds), the
    middle of three passes after one warm-up call: the crossover measurements' timer."""
    call(*arguments[0])  # warm the code path
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for args in arguments:
            call(*args)
        times.append((time.perf_counter() - start) / len(arguments))
    return sorted(times)[1] * 1e3


def keeping_thresholds(fraction: float, channels: int) -> torch.Tensor:
    """float32 [channels] thresholds that keep `fraction` of the channels (-1 keeps any value, inf drops it), the
    same random channels on every call."""
    order = torch.randperm(channels, generator=torch.Generator().manual_seed(0))
    tau = torch.full((channels,), math.inf)
    tau[order[:max(1, round(fraction * channels))]] = -1.0
    return tau


def kept_channels(flat: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """[segments, tokens, in] bool: the rule |x[t, i]| > tau[s, i] for every segment."""
    return flat.abs().unsqueeze(0) > tau.unsqueeze(1)


def gather_pays_off(keep: torch.Tensor, plan: GatherPlan) -> bool:
    """Data-level part: the rows the gather would read, as a fraction of one dense pass."""
    segments, tokens, in_features = keep.shape
    if tokens <= plan.max_row_fraction:
        return True  # even every row of every token stays under the crossover: no need to count
    return int(keep.sum()) <= plan.max_row_fraction * segments * in_features


def sparse_linear_cpu(flat: torch.Tensor, tau: torch.Tensor, segment_weights_t, bias, plan: GatherPlan):
    """The sparse product of every segment through the gather: tau [segments, in], segment_weights_t[s]: [in, out_s]
    with unit stride along out. None where the kept rows exceed the plan's crossover: the caller then runs the
    masked dense product, which makes the same decisions."""
    if flat.shape[0] == 1:
        outputs = _one_token_products(flat[0], tau, segment_weights_t, plan)
    else:
        keep = kept_channels(flat, tau)
        outputs = ([gather_rows_product(flat, keep[s], w_t, plan.bags) for s, w_t in enumerate(segment_weights_t)]
                   if gather_pays_off(keep, plan) else None)
    if outputs is None:
        return None
    y = (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)).view(flat.shape[0], -1)  # one token's are 1-D
    return y if bias is None else y + bias


def gather_rows_product(x_row_major: torch.Tensor, keep: torch.Tensor, weight_t: torch.Tensor,
                        bags_per_token: int) -> torch.Tensor:
    """[tokens, out] = for each token t, sum over i with keep[t, i] of x[t, i] * weight_t[i] (a few tokens).

    weight_t: [in, out] with unit stride along out (a column slice of a wider W^T is fine).
    """
    tokens, in_features = keep.shape
    token_ids, channel_ids = keep.nonzero(as_tuple=True)  # row-major: grouped by token, channels ascending
    # Split every token's channels into `bags_per_token` ranges: one bag per thread.
    bag_ids = token_ids * bags_per_token + channel_ids * bags_per_token // in_features
    counts = torch.bincount(bag_ids, minlength=tokens * bags_per_token)
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    out = F.embedding_bag(channel_ids, weight_t, offsets, mode="sum",
                          per_sample_weights=x_row_major[token_ids, channel_ids])
    return out.view(tokens, bags_per_token, -1).sum(1)  # bf16 partial sums: see _bag_sum


def _one_token_products(x: torch.Tensor, tau: torch.Tensor, segment_weights_t, plan: GatherPlan):
    """Decode's case, [out_s] per segment, in as few torch calls as possible: each costs microseconds, a decode
    step makes hundreds, and on a small model they were as much as the bytes the gather saves."""
    keep = x.abs() > tau  # [segments, in]: one comparison for every segment
    channels = [keep[s].nonzero().view(-1) for s in range(len(segment_weights_t))]
    if plan.max_row_fraction < 1:  # nonzero's sizes are known on the host: counting is free
        if sum(c.numel() for c in channels) > plan.max_row_fraction * len(channels) * x.numel():
            return None
    return [_bag_sum(x, c, w_t, plan.bags) for c, w_t in zip(channels, segment_weights_t)]


def _bag_sum(x: torch.Tensor, channels: torch.Tensor, weight_t: torch.Tensor, bags: int) -> torch.Tensor:
    """sum over the kept channels c of x[c] * weight_t[c], as `bags` bags over equal ranges of channels (one per
    thread; their offsets found by one searchsorted), partial sums added after (bf16's in fp32: torch's sum
    accumulates in fp32 and rounds once)."""
    offsets = _ZERO_OFFSET if bags == 1 else torch.searchsorted(channels, _bag_starts(x.numel(), bags))
    out = F.embedding_bag(channels, weight_t, offsets, mode="sum", per_sample_weights=x.index_select(0, channels))
    return out[0] if bags == 1 else out.sum(0)


_ZERO_OFFSET = torch.zeros(1, dtype=torch.long)
_starts: dict = {}


def _bag_starts(in_features: int, bags: int) -> torch.Tensor:
    key = (in_features, bags)
    if key not in _starts:
        _starts[key] = torch.tensor([in_features * b // bags for b in range(bags)], dtype=torch.long)
    return _starts[key]


class TransposedRows:
    """W^T per segment for the gather, built once per weight tensor (rebuilt after model.to(...))."""

    def __init__(self):
        self.source = None  # (data_ptr, dtype, shape) of the weight the rows were built from
        self.segments = ()

    def for_weight(self, linear) -> tuple:
        weight = local(linear.weight)  # this rank's shard under tensor parallelism
        key = (weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.stride())
        if self.source != key:
            with torch.no_grad():
                if weight.stride(0) == 1:
                    weight_t = weight.detach().t()  # already stored as W^T (detached: embedding_bag on a
                    # weight that requires grad takes its slower training variant)
                else:
                    weight_t = weight.detach().t().contiguous()
                    if not separate_transpose_needed(weight.dtype):
                        set_local(linear, "weight", weight_t.t())  # one copy serves dense and gather
                        weight = local(linear.weight)
                        key = (weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.stride())
            ends, start, segments = linear.segment_ends, 0, []
            for end in ends:
                segments.append(weight_t[:, start:end])
                start = end
            self.segments, self.source = tuple(segments), key
        return self.segments

    def clear(self):
        self.source, self.segments = None, ()
