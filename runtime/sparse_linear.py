"""nn.Linear that drops input channels whose score is under a threshold.

The rule, per token t and input channel i of output segment s:
    keep  <=>  |x[t, i]| > tau[s, i],   tau[s, i] = threshold_s / ||W_s[:, i]||  (WINA)
                                         tau[s, i] = threshold_s                  (TEAL)
which is WINA's |x_i| * ||W[:, i]|| > t written so one comparison per channel serves both
methods. A fused linear (Phi-3's qkv_proj, gate_up_proj) has one segment per projection, each with
its own threshold, all reading one input. Separate linears that read one input (Llama's q/k/v and
gate/up) are joined in a SharedInputGroup on the GPU, so decode still makes one launch for them.

Under transformers' tensor parallelism (tp_plan) each rank's module holds a shard of the weight; its forward
sees this rank's input channels and returns this rank's outputs, and runtime/tensor_parallel.py gives it the
whole-column norms and the segments its rows hold, so every keep decision is the single-process model's.
"""

import itertools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import TransposedRows, gather_may_win, gather_supported, sparse_linear_cpu
from .kernels import HAS_TRITON, sparse_linear_triton, use_sparse_kernel
from .tensor_parallel import column_norms, held_segments, is_sharded, local, row_shard, set_local

logger = logging.getLogger(__name__)
_announced_paths: set[str] = set()


def _uses_kernels(tensor: torch.Tensor) -> bool:
    """Whether products on this tensor's device take the GPU path (Triton decode kernels, joined q/k/v and
    gate/up weights) rather than the CPU path (row gather). Every device decision of this module asks here."""
    return tensor.is_cuda


def announce_path(on_gpu: bool) -> None:
    """Say once per process which path the sparse linears take (never from forward: it would break graphs)."""
    if on_gpu and HAS_TRITON:
        path = "Triton kernels for decode (GPU), masked dense product for prefill"
    elif on_gpu:
        path = "torch masked dense product (GPU; Triton is not installed)"
    else:
        path = ("row gather of the kept rows of W^T for decode and small batches where it is faster on this "
                "machine (torch embedding_bag, timed once per shape at the first decode step; bf16 keeps a "
                "second, transposed copy of each weight), masked dense product otherwise (CPU)")
    if path not in _announced_paths:
        _announced_paths.add(path)
        logger.warning("winaconv: sparse linears run on the %s path", path)


def channel_thresholds(norms: torch.Tensor, threshold: float, scored_with_norm: bool) -> torch.Tensor:
    """tau for one segment with these column norms: the threshold on |x_i| equivalent to the segment's rule."""
    if not scored_with_norm:
        return torch.full(norms.shape, float(threshold), dtype=torch.float32, device=norms.device)
    inf = torch.full_like(norms, float("inf"))
    return torch.where(norms > 0, threshold / norms, inf)


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias, tau: torch.Tensor, segment_sizes) -> torch.Tensor:
    """The reference rule in plain torch: mask the input per segment, then a dense product."""
    if len(segment_sizes) == 1:  # no split views: a bf16 F.linear on a view of W is slower (CPU)
        return F.linear(x * (x.abs() > tau[0]), weight, bias)
    outputs = []
    biases = bias.split(segment_sizes) if bias is not None else [None] * len(segment_sizes)
    for w, b, t in zip(weight.split(segment_sizes, dim=0), biases, tau):
        outputs.append(F.linear(x * (x.abs() > t).to(x.dtype), w, b))
    return _joined(outputs)


def _joined(pieces: list) -> torch.Tensor:
    """Per-segment outputs side by side (no copy for one)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)


# Decode-sized batches on the GPU path (above batch 1, where the sparse kernel loses to cuBLAS): a product whose
# segments keep different channels runs as one dense product over every segment's masked input, stacked.
STACKED_MAX_TOKENS = 8


def stacked_masked_products(x: torch.Tensor, weight: torch.Tensor, bias, tau: torch.Tensor, segment_sizes) -> list:
    """masked_linear's products for a few tokens in one product, as one [T, size] view per segment: row block s of
    the stacked input [segments * T, in] is x masked by segment s's thresholds, and segment s's columns are read
    from that block. The weight is read once, as masked_linear reads it segment by segment, but in one launch
    instead of one per segment, as level 0 runs a joined group; the extra products cost little where the weight's
    bytes bound the time. The blocks are joined with cat, each one x's shape, so that a compiled step can compute
    them in the kernel that makes x (the norm before q/k/v and gate/up) instead of a kernel of their own."""
    segments, tokens = len(segment_sizes), x.shape[0]
    stacked = torch.cat([x * (x.abs() > tau[s]) for s in range(segments)])
    y = F.linear(stacked, weight, bias).view(segments, tokens, -1)
    ends = itertools.accumulate(segment_sizes)
    return [y[s, :, end - size:end] for s, (size, end) in enumerate(zip(segment_sizes, ends))]


class SparseLinear(nn.Linear):
    """A drop-in nn.Linear (same parameters, same state-dict keys) with WINA/TEAL input masking.

    With no thresholds set it is exactly nn.Linear (the dense model).
    """

    # transformers' tensor-parallel wrappers hand a module flagged so its local shard and local input even where
    # autograd is on: the keep rule compares the input with this rank's own (plain tensor) thresholds.
    _hf_quantized_needs_local_tp = True

    def __init__(self, in_features, out_features, bias=True, segment_sizes=None, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_sparse_state(segment_sizes)

    @classmethod
    def from_linear(cls, linear: nn.Linear, segment_sizes=None) -> "SparseLinear":
        sparse = cls.__new__(cls)
        nn.Module.__init__(sparse)
        sparse.in_features, sparse.out_features = linear.in_features, linear.out_features
        sparse.weight, sparse.bias = linear.weight, linear.bias
        sparse._init_sparse_state(segment_sizes)
        return sparse

    def _init_sparse_state(self, segment_sizes) -> None:
        self.segment_sizes = tuple(segment_sizes or (self.out_features,))
        if sum(self.segment_sizes) != self.out_features:
            raise ValueError(f"segments {self.segment_sizes} do not add up to {self.out_features} outputs")
        self.segment_ends = tuple(itertools.accumulate(self.segment_sizes))
        # The projections' segments; segment_sizes become those of this rank's rows once the weight is sharded.
        self.projection_segments = self.segment_sizes
        self._segment_index = tuple(range(len(self.segment_sizes)))  # the projection segment each one is
        self.register_buffer("tau", None, persistent=False)
        self.kept_percent = 100  # share of input channels the stored level keeps: it picks the GPU kernel's kind
        self.shared_input_group = None
        self._pending = None  # (input, output) left by the SharedInputGroup member that ran the launch
        self._cpu_rows = TransposedRows()

    @property
    def is_sparse(self) -> bool:
        return self.tau is not None

    @torch.no_grad()
    def set_thresholds(self, thresholds, scored_with_norm, sparsities=None) -> None:
        """thresholds: one per segment, or None for dense. scored_with_norm: one bool per segment. sparsities:
        the calibrated share of dropped channels per segment, if known (the least sparse segment decides the
        kernel kind of the product)."""
        self.kept_percent = 100 if not sparsities else round(100 * (1 - min(float(s) for s in sparsities)))
        if thresholds is None:
            self.tau = None
            self._cpu_rows.clear()  # the dense model keeps no second copy
            if self.shared_input_group is not None and _uses_kernels(local(self.weight)):
                self.shared_input_group.fuse()  # dense on the GPU too: one product for the group
            return
        norms = self._column_norms()
        tau = torch.stack([channel_thresholds(norms[i], thresholds[i], scored_with_norm[i]) for i in self._segment_index])
        if self.tau is not None and self.tau.shape == tau.shape:
            self.tau.copy_(tau)  # in place: compiled graphs and CUDA graphs keep reading this buffer
        else:
            self.tau = tau
            if self.shared_input_group is not None:
                self.shared_input_group.invalidate()  # the group's thresholds must take the new tensor in
        self._lay_out_for_kernel()

    def _column_norms(self) -> torch.Tensor:
        """Per projection segment, the float32 norms of whole weight columns over this module's input channels,
        kept while the weight is unchanged: the greedy allocation sets thresholds thousands of times per layer,
        and recomputing them took a large share of its time."""
        weight = self.weight
        if is_sharded(weight):
            # Computing them takes a collective, which every rank must enter together: key on what all ranks
            # share, never on local storage (a tensor-parallel model's weights do not change after loading).
            self._adopt_shard()
            key = ("sharded", weight.dtype, weight.device)
        else:
            key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if getattr(self, "_norms_key", None) != key:
            self._norms, self._norms_key = column_norms(weight, self.projection_segments), key
        return self._norms

    def _adopt_shard(self) -> None:
        """Take the segments this rank's rows hold as the ones the forward computes (a fused linear's column-wise
        shard may hold part of one projection, or none of another)."""
        held = held_segments(self.projection_segments, row_shard(self.weight))
        self._segment_index = tuple(index for index, _ in held)
        self.segment_sizes = tuple(rows for _, rows in held)
        self.segment_ends = tuple(itertools.accumulate(self.segment_sizes))

    def _lay_out_for_kernel(self) -> None:
        weight = local(self.weight)
        if weight.device.type == "cpu" and not _uses_kernels(weight):
            if gather_supported(weight.dtype):
                self._cpu_rows.for_weight(self)  # W^T rows for the CPU gather, made at load rather than mid-decode
        elif self.shared_input_group is not None:
            self.shared_input_group.fuse()  # lays out all members at once
        elif _uses_kernels(weight) and HAS_TRITON and weight.stride(0) != 1:
            # The decode kernel reads one contiguous row of W^T per kept channel; F.linear
            # takes the transposed layout just as well, so one copy serves both paths.
            set_local(self, "weight", weight.detach().t().contiguous().t())

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        self._cpu_rows.clear()  # never keep a stale (host) W^T copy after a move or dtype change
        if self.shared_input_group is not None:
            self.shared_input_group.invalidate()  # members move one by one: the model re-joins them
        elif self.tau is not None:  # moved after thresholds were set (model.to("cuda"))
            self._lay_out_for_kernel()
        return module

    def _runs_kernel(self, flat: torch.Tensor) -> bool:
        group = self.shared_input_group
        out_features = self.weight.shape[0] if group is None else group.out_features
        return (
            HAS_TRITON
            and _uses_kernels(flat)
            and self.weight.stride(0) == 1
            and (group is None or group.is_fused)
            and use_sparse_kernel(flat.shape[0], flat.shape[1], out_features)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes come from the tensors, not in_features / out_features: under tensor parallelism x holds this
        # rank's input channels, self.weight its shard, and the output is its rows.
        if self.tau is None:
            group = self.shared_input_group
            if group is not None and group.joined and _uses_kernels(x):
                return group.output_for(self, x)
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        group = self.shared_input_group
        if flat.device.type == "cpu" and not _uses_kernels(flat):
            y = self._cpu_forward(flat)
        elif self._runs_kernel(flat):
            y = group.output_for(self, x) if group is not None else sparse_linear_triton(
                flat.contiguous(), self.weight.t(), self.tau, self.segment_ends, self.bias, self.kept_percent)
        elif flat.shape[0] > STACKED_MAX_TOKENS:
            y = masked_linear(flat, self.weight, self.bias, self.tau, self.segment_sizes)
        elif group is not None and group.is_fused:
            y = group.output_for(self, x, sparse_kernel=False)
        elif len(self.segment_sizes) > 1:
            y = _joined(stacked_masked_products(flat, self.weight, self.bias, self.tau, self.segment_sizes))
        else:
            y = masked_linear(flat, self.weight, self.bias, self.tau, self.segment_sizes)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def _cpu_forward(self, flat: torch.Tensor) -> torch.Tensor:
        """Row gather where cpu_kernels' measured policy says it beats the masked dense product."""
        plan = gather_may_win(flat.shape[0], flat.shape[1], self.weight.shape[0], flat.dtype)
        if plan is not None:
            y = sparse_linear_cpu(flat, self.tau, self._cpu_rows.for_weight(self), self.bias, plan)
            if y is not None:
                return y
        return masked_linear(flat, self.weight, self.bias, self.tau, self.segment_sizes)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, segments={self.segment_sizes}, sparse={self.is_sparse}"


class SharedInputGroup:
    """Separate linears that read one input (q/k/v, gate/up), run as one launch.

    On the GPU the members' W^T are stored side by side in one [in, sum(out)] tensor and each
    member's weight becomes a view of its columns (no extra memory; state-dict keys unchanged): `joined`.
    At a sparse level their thresholds also become rows of one [segments, in] tensor (`is_fused`) and decode
    makes one kernel launch for the group; at level 0 every product of the group is one dense F.linear. The
    first member called computes the output of all of them and leaves each other member its slice, tagged
    with the input it belongs to; transformers' own attention and MLP code stays untouched.
    """

    def __init__(self, members):
        self.members = tuple(members)
        self._measure()
        self.weight_t = self.bias = self.tau = None
        self.joined = self.is_fused = False
        for member in self.members:
            member.shared_input_group = self

    def _measure(self) -> None:
        """Segments and column ranges of the joined W^T, from the members' (local, under tensor parallelism) rows."""
        self.segment_sizes = tuple(size for m in self.members for size in m.segment_sizes)
        self.segment_ends = tuple(itertools.accumulate(self.segment_sizes))
        ends = tuple(itertools.accumulate(local(m.weight).shape[0] for m in self.members))
        self.out_features = ends[-1]
        self.column_ranges = tuple(zip((0,) + ends[:-1], ends))

    def invalidate(self) -> None:
        """The thresholds (or, after a move, the weights) must be joined again by the next fuse()."""
        self.is_fused = False
        self.joined = self.joined and self._weights_are_fused()

    @torch.no_grad()
    def fuse(self) -> None:
        members = self.members
        weight = local(members[0].weight)
        if not _uses_kernels(weight) or not HAS_TRITON:
            self.joined = self.is_fused = False
            return
        if self.is_fused:
            return
        self._measure()
        if not self._weights_are_fused():
            fused = weight.new_empty((weight.shape[1], self.out_features))
            for m, (start, end) in zip(members, self.column_ranges):
                fused[:, start:end].copy_(local(m.weight).t())
                set_local(m, "weight", fused[:, start:end].t())
            self.weight_t = fused
        self.bias = self._fused_bias()
        self.joined = True
        if any(m.tau is None for m in members):  # level 0, or a level being set member by member
            return
        tau = torch.cat([m.tau for m in members])
        if self.tau is not None and self.tau.shape == tau.shape and self.tau.device == tau.device:
            self.tau.copy_(tau)  # keep the tensor graphs were captured with
        else:
            self.tau = tau.contiguous()
        row = 0
        for m in members:
            rows = len(m.segment_sizes)
            m.tau = self.tau[row:row + rows]  # a view: set_thresholds' in-place updates reach the group
            row += rows
        self.is_fused = True

    def _weights_are_fused(self) -> bool:
        return self.weight_t is not None and all(
            _is_view(local(m.weight), self.weight_t[:, start:end].t())
            for m, (start, end) in zip(self.members, self.column_ranges)
        )

    def _fused_bias(self):
        if all(m.bias is None for m in self.members):
            return None
        fused = self.bias
        if fused is not None and all(
            _is_view(local(m.bias), fused[start:end]) for m, (start, end) in zip(self.members, self.column_ranges)
        ):
            return fused  # keep the tensor graphs were captured with
        fused = local(self.members[0].weight).new_zeros(self.out_features)
        for m, (start, end) in zip(self.members, self.column_ranges):
            if m.bias is not None:
                fused[start:end].copy_(local(m.bias))
                set_local(m, "bias", fused[start:end])
        return fused

    def output_for(self, member: SparseLinear, x: torch.Tensor, sparse_kernel: bool = True) -> torch.Tensor:
        """member's output for input x: left by the product an earlier member ran on x, or run now for the group
        (one dense F.linear at level 0; at a sparse level one sparse kernel launch over the flattened tokens, or,
        for a few tokens where the kernel does not run, one stacked masked product)."""
        pending = member._pending
        if pending is not None and pending[0] is x:
            member._pending = None
            return pending[1]
        if member.tau is None:
            y = F.linear(x, self.weight_t.t(), self.bias)
        elif sparse_kernel:
            kept_percent = max(m.kept_percent for m in self.members)
            y = sparse_linear_triton(x.reshape(-1, x.shape[-1]).contiguous(), self.weight_t, self.tau,
                                     self.segment_ends, self.bias, kept_percent)
        else:
            pieces = stacked_masked_products(x.reshape(-1, x.shape[-1]), self.weight_t.t(), self.bias, self.tau,
                                             self.segment_sizes)
            outputs, first = [], 0
            for m in self.members:  # each member's segments are the next ones
                outputs.append(_joined(pieces[first:first + len(m.segment_sizes)]))
                first += len(m.segment_sizes)
            return self._hand_out(member, x, outputs)
        return self._hand_out(member, x, [y[..., start:end] for start, end in self.column_ranges])

    def _hand_out(self, member: SparseLinear, x: torch.Tensor, outputs: list) -> torch.Tensor:
        """member's output of the group's outputs (one per member); the other members' wait for their call on x."""
        own = None
        for m, output in zip(self.members, outputs):
            if m is member:
                own = output
            else:
                m._pending = (x, output)
        return own


def _is_view(tensor, view) -> bool:
    """Whether `tensor` is exactly `view` (same memory, layout, dtype): kept tensors mean kept graphs."""
    return (
        tensor is not None and tensor.device == view.device and tensor.dtype == view.dtype
        and tensor.shape == view.shape and tensor.stride() == view.stride() and tensor.data_ptr() == view.data_ptr()
    )
