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

# Crossovers (benchmarks/cpu.md, cold-cache timings of one linear): embedding_bag moves a kept row
# about half as fast per byte as the dense GEMV (single thread: 2.1x dense time at 0% in fp32, 1.5x
# in bf16), so the gather wins only while the rows it reads, kept channels summed over the tokens of
# the call, stay under this fraction of the rows one dense product reads. Above it (low sparsity,
# prefill, batches whose tokens keep many rows) the masked dense product runs.
GATHER_MAX_ROW_FRACTION = {torch.float32: 0.45, torch.bfloat16: 0.35}
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
    return int(keep.sum()) <= GATHER_MAX_ROW_FRACTION[dtype] * segments * in_features


def gather_rows_product(x_row_major: torch.Tensor, keep: torch.Tensor, weight_t: torch.Tensor,
                        bags_per_token: int) -> torch.Tensor:
    """[tokens, out] = for each token t, sum over i with keep[t, i] of x[t, i] * weight_t[i].

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
    accumulate = torch.promote_types(weight_t.dtype, torch.float32)  # bf16 partial sums added in fp32
    return out.view(tokens, bags_per_token, -1).sum(1, dtype=accumulate).to(weight_t.dtype)


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
