"""The CPU's activation-sparse product: read only the rows of W^T whose input channel is kept.

Batch-1 decode on a CPU is bound by memory bandwidth, as on a GPU. With W^T stored row-major, each
input channel is one contiguous row, and
    y[t] = sum over kept i of x[t, i] * W^T[i]
is exactly what torch's embedding_bag computes (indices = kept channels, per_sample_weights = their
values, mode="sum"), with its own vectorised loop over a row and no extra compiled code. embedding_bag
runs one bag per thread, so each token's kept channels are split into one bag per thread of torch's
pool and the partial sums added afterwards.

Candidates measured on the project's 2-core machine (benchmarks/cpu.md): index_select + mv
materialises the gathered rows (2-4x slower than embedding_bag in fp32, 10-30x in bf16, where mv is
slow); a torch.compile'd (inductor, dynamic) gather materialises them too (20-40x slower);
embedding_bag is the only one that reads each kept row once and writes nothing else.

Layout: fp32 F.linear is as fast on the transposed layout as on the original one, so fp32 weights are
re-laid as W^T once (one copy serves both paths). bf16 F.linear on the transposed layout is ~40x
slower on CPUs without native bf16 matmul, so bf16 keeps W for the dense product and adds W^T for the
gather (twice the weight memory, said in the one-line notice).
"""

import torch
import torch.nn.functional as F

# Crossovers (benchmarks/cpu.md, one linear with cold caches, on an idle 2-core machine): embedding_bag
# streams the rows of W^T at least as fast per byte as torch's dense GEMV at batch 1 (fp32: 1.1-2.2x
# the dense speed with every row kept on shapes from 576x1536 up; bf16: 1.1-1.2x on the 1B shapes), so
# the gather runs while the rows it reads, kept channels summed over the tokens of the call, stay under
# one dense pass. Above it (prefill, batches whose tokens keep many rows) the masked dense product runs.
# An earlier, lower crossover (0.45 / 0.35) came from timings on a machine saturated by other jobs.
GATHER_MAX_ROW_FRACTION = {torch.float32: 1.0, torch.bfloat16: 1.0}
# Small matrices: the fixed cost of mask + nonzero + the call dominates; the dense product wins.
GATHER_MIN_WEIGHTS = 1 << 16
GATHER_MAX_TOKENS = 8


def separate_transpose_needed(dtype: torch.dtype) -> bool:
    """Whether the dense product needs W in its original layout (so W^T is an extra copy)."""
    return dtype != torch.float32


def gather_supported(dtype: torch.dtype) -> bool:
    return dtype in GATHER_MAX_ROW_FRACTION


def gather_may_win(num_tokens: int, in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Shape-level part of the policy, decided before the mask is computed."""
    return (
        gather_supported(dtype)
        and num_tokens <= GATHER_MAX_TOKENS
        and in_features * out_features >= GATHER_MIN_WEIGHTS
    )


def kept_channels(flat: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """[segments, tokens, in] bool: the rule |x[t, i]| > tau[s, i] for every segment."""
    return flat.abs().unsqueeze(0) > tau.unsqueeze(1)


def gather_pays_off(keep: torch.Tensor, dtype: torch.dtype) -> bool:
    """Data-level part: the rows the gather would read, as a fraction of one dense pass."""
    segments, tokens, in_features = keep.shape
    if tokens <= GATHER_MAX_ROW_FRACTION[dtype]:
        return True  # even every row of every token stays under the crossover: no need to count
    return int(keep.sum()) <= GATHER_MAX_ROW_FRACTION[dtype] * segments * in_features


def gather_rows_product(x_row_major: torch.Tensor, keep: torch.Tensor, weight_t: torch.Tensor,
                        bags_per_token: int) -> torch.Tensor:
    """[tokens, out] = for each token t, sum over i with keep[t, i] of x[t, i] * weight_t[i].

    weight_t: [in, out] with unit stride along out (a column slice of a wider W^T is fine).
    """
    if keep.shape[0] == 1:
        return _one_token_product(x_row_major[0], keep[0], weight_t, bags_per_token)
    tokens, in_features = keep.shape
    token_ids, channel_ids = keep.nonzero(as_tuple=True)  # row-major: grouped by token, channels ascending
    # Split every token's channels into `bags_per_token` ranges: one bag per thread.
    bag_ids = token_ids * bags_per_token + channel_ids * bags_per_token // in_features
    counts = torch.bincount(bag_ids, minlength=tokens * bags_per_token)
    offsets = torch.zeros_like(counts)
    offsets[1:] = counts.cumsum(0)[:-1]
    out = F.embedding_bag(channel_ids, weight_t, offsets, mode="sum",
                          per_sample_weights=x_row_major[token_ids, channel_ids])
    return out.view(tokens, bags_per_token, -1).sum(1, dtype=_accumulation(weight_t.dtype)).to(weight_t.dtype)


def _one_token_product(x: torch.Tensor, keep: torch.Tensor, weight_t: torch.Tensor, bags: int) -> torch.Tensor:
    """Decode's case, in as few torch calls as possible (each costs microseconds, and a decode step makes
    hundreds): the kept channels split into `bags` runs of equal length, one per thread."""
    channels = keep.nonzero().squeeze(1)
    kept = channels.numel()
    offsets = torch.tensor([kept * b // bags for b in range(bags)], dtype=torch.long)
    out = F.embedding_bag(channels, weight_t, offsets, mode="sum", per_sample_weights=x.index_select(0, channels))
    if bags == 1:
        return out
    return out.sum(0, keepdim=True, dtype=_accumulation(weight_t.dtype)).to(weight_t.dtype)


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16 partial sums added in fp32


def sparse_linear_cpu(flat: torch.Tensor, keep: torch.Tensor, segment_weights_t, bias) -> torch.Tensor:
    """The sparse product of every segment: keep [segments, tokens, in], segment_weights_t[s]: [in, out_s]."""
    bags = max(1, torch.get_num_threads())
    outputs = [gather_rows_product(flat, keep[s], w_t, bags) for s, w_t in enumerate(segment_weights_t)]
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
    return y if bias is None else y + bias


class TransposedRows:
    """W^T per segment for the gather, built once per weight tensor (rebuilt after model.to(...))."""

    def __init__(self):
        self.source = None  # (data_ptr, dtype, shape) of the weight the rows were built from
        self.segments = ()

    def for_weight(self, linear) -> tuple:
        weight = linear.weight
        key = (weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.stride())
        if self.source != key:
            with torch.no_grad():
                if weight.stride(0) == 1:
                    weight_t = weight.t()  # already stored as W^T
                else:
                    weight_t = weight.detach().t().contiguous()
                    if not separate_transpose_needed(weight.dtype):
                        linear.weight.data = weight_t.t()  # one copy serves dense and gather
                        weight = linear.weight
                        key = (weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.stride())
            ends, start, segments = linear.segment_ends, 0, []
            for end in ends:
                segments.append(weight_t[:, start:end])
                start = end
            self.segments, self.source = tuple(segments), key
        return self.segments

    def clear(self):
        self.source, self.segments = None, ()
