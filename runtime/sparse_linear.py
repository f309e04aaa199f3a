"""nn.Linear that drops input channels whose score is under a threshold.

The rule, per token t and input channel i of output segment s:
    keep  <=>  |x[t, i]| > tau[s, i],   tau[s, i] = threshold_s / ||W_s[:, i]||  (WINA)
                                         tau[s, i] = threshold_s                  (TEAL)
which is WINA's |x_i| * ||W[:, i]|| > t written so one comparison per channel serves both
methods. A fused linear (q/k/v, gate/up) has one segment per projection, each with its own
threshold, all reading one input.
"""

import itertools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import HAS_TRITON, sparse_linear_triton, use_sparse_kernel

logger = logging.getLogger(__name__)
_announced_paths: set[str] = set()


def announce_path(on_gpu: bool) -> None:
    """Say once per process which path the sparse linears take (never from forward: it would break graphs)."""
    if on_gpu and HAS_TRITON:
        path = "Triton kernels for decode (GPU), masked dense product for prefill"
    elif on_gpu:
        path = "torch masked dense product (GPU; Triton is not installed)"
    else:
        path = "torch masked dense product (CPU)"
    if path not in _announced_paths:
        _announced_paths.add(path)
        logger.warning("winaconv: sparse linears run on the %s path", path)


def channel_thresholds(weight: torch.Tensor, threshold: float, scored_with_norm: bool) -> torch.Tensor:
    """tau for one segment: the threshold on |x_i| equivalent to the segment's rule."""
    in_features = weight.shape[1]
    if not scored_with_norm:
        return torch.full((in_features,), float(threshold), dtype=torch.float32, device=weight.device)
    norms = weight.float().norm(dim=0)
    inf = torch.full_like(norms, float("inf"))
    return torch.where(norms > 0, threshold / norms, inf)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias, tau: torch.Tensor, segment_sizes) -> torch.Tensor:
    """The reference rule in plain torch: mask the input per segment, then a dense product."""
    outputs = []
    biases = bias.split(segment_sizes) if bias is not None else [None] * len(segment_sizes)
    for w, b, t in zip(weight.split(segment_sizes, dim=0), biases, tau):
        outputs.append(F.linear(x * (x.abs() > t).to(x.dtype), w, b))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


class SparseLinear(nn.Linear):
    """A drop-in nn.Linear (same parameters, same state-dict keys) with WINA/TEAL input masking.

    With no thresholds set it is exactly nn.Linear (the dense model).
    """

    def __init__(self, in_features, out_features, bias=True, segment_sizes=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.segment_sizes = tuple(segment_sizes or (out_features,))
        if sum(self.segment_sizes) != out_features:
            raise ValueError(f"segments {self.segment_sizes} do not add up to {out_features} outputs")
        self.segment_ends = tuple(itertools.accumulate(self.segment_sizes))
        self.register_buffer("tau", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, segment_sizes=None) -> "SparseLinear":
        sparse = cls.__new__(cls)
        nn.Module.__init__(sparse)
        sparse.in_features, sparse.out_features = linear.in_features, linear.out_features
        sparse.weight, sparse.bias = linear.weight, linear.bias
        sparse.segment_sizes = tuple(segment_sizes or (linear.out_features,))
        sparse.segment_ends = tuple(itertools.accumulate(sparse.segment_sizes))
        sparse.register_buffer("tau", None, persistent=False)
        return sparse

    @property
    def is_sparse(self) -> bool:
        return self.tau is not None

    @torch.no_grad()
    def set_thresholds(self, thresholds, scored_with_norm) -> None:
        """thresholds: one per segment, or None for dense. scored_with_norm: one bool per segment."""
        if thresholds is None:
            self.tau = None
            return
        segments = self.weight.split(self.segment_sizes, dim=0)
        tau = torch.stack([channel_thresholds(w, t, n) for w, t, n in zip(segments, thresholds, scored_with_norm)])
        if self.tau is not None and self.tau.shape == tau.shape:
            self.tau.copy_(tau)  # in place: compiled graphs and CUDA graphs keep reading this buffer
        else:
            self.tau = tau
        self._lay_out_for_kernel()

    def _lay_out_for_kernel(self) -> None:
        if self.weight.is_cuda and HAS_TRITON and not self.weight.t().is_contiguous():
            # The decode kernel reads one contiguous row of W^T per kept channel; F.linear
            # takes the transposed layout just as well, so one copy serves both paths.
            self.weight.data = self.weight.data.t().contiguous().t()

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        if self.tau is not None:  # moved after thresholds were set (model.to("cuda"))
            self._lay_out_for_kernel()
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tau is None:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, self.in_features)
        tokens = flat.shape[0]
        if (
            flat.is_cuda
            and HAS_TRITON
            and self.weight.t().is_contiguous()
            and use_sparse_kernel(tokens, self.in_features, self.out_features)
        ):
            y = sparse_linear_triton(flat.contiguous(), self.weight.t(), self.tau, self.segment_ends, self.bias)
        else:
            y = masked_linear(flat, self.weight, self.bias, self.tau, self.segment_sizes)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, segments={self.segment_sizes}, sparse={self.is_sparse}"
