"""Bounds checking for Triton kernels run by the CPU interpreter (TRITON_INTERPRET=1).

The interpreter dereferences raw addresses: a load or store the kernel's masks let through outside
its tensors reads or corrupts the test process's heap (a crash much later, or nothing at all).
`bounds_checked()` turns every such access into an `OutOfBounds` error at the offending launch: each
masked-in address of a load, store or atomic must lie inside one of the launch's tensor arguments
(the span of the view as passed, not its whole storage).

It hooks the interpreter's launch and memory builders (triton.runtime.interpreter, checked with
triton 3.2-3.9); where those names are missing it reports itself unavailable instead of guessing.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import torch

try:
    from triton.runtime import interpreter as _interp

    _HOOKS = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
    AVAILABLE = hasattr(_interp, "GridExecutor") and all(hasattr(_interp.InterpreterBuilder, h) for h in _HOOKS)
except Exception:  # pragma: no cover - triton missing
    _interp = None
    AVAILABLE = False


class OutOfBounds(AssertionError):
    pass


def _span(t: torch.Tensor):
    """[first byte, one past the last byte] of the elements a view can address."""
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _check(spans, ptrs, mask, what):
    addr = np.asarray(ptrs.data).astype(np.uint64)
    if mask is not None:
        addr = addr[np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)]
    addr = addr.ravel()
    if addr.size == 0:
        return
    size = np.uint64(ptrs.get_element_ty().primitive_bitwidth // 8)
    inside = np.zeros(addr.shape, dtype=bool)
    for lo, hi in spans:
        inside |= (addr >= np.uint64(lo)) & (addr + size <= np.uint64(hi))
    if not inside.all():
        bad = [hex(int(a)) for a in addr[~inside][:3]]
        raise OutOfBounds(f"{what} of {int((~inside).sum())} element(s) outside every tensor argument, e.g. {bad}")


@contextlib.contextmanager
def bounds_checked():
    """Within this block, interpreted kernels raise on any out-of-bounds memory access."""
    if not AVAILABLE:
        raise RuntimeError("the Triton interpreter's hooks are not where this checker expects them")
    spans = []  # of the launch now running (launches do not nest)
    builder = _interp.InterpreterBuilder
    originals = {name: getattr(builder, name) for name in _HOOKS}
    launch = _interp.GridExecutor.__call__

    def checked_launch(self, *args, **kwargs):
        outer = list(spans)
        unwrap = getattr(_interp, "_unwrap_tensor", lambda a: getattr(a, "base", a))  # TensorWrapper -> tensor
        spans[:] = [_span(a) for a in map(unwrap, list(args) + list(kwargs.values()))
                    if isinstance(a, torch.Tensor) and a.numel()]
        try:
            return launch(self, *args, **kwargs)
        finally:
            spans[:] = outer

    def load(self, ptrs, mask, other, *rest):
        _check(spans, ptrs, mask, "load")
        return originals["create_masked_load"](self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        _check(spans, ptrs, mask, "store")
        return originals["create_masked_store"](self, ptrs, value, mask, *rest)

    def atomic_rmw(self, op, ptr, val, mask, *rest):
        _check(spans, ptr, mask, "atomic")
        return originals["create_atomic_rmw"](self, op, ptr, val, mask, *rest)

    def atomic_cas(self, ptr, *rest):
        _check(spans, ptr, None, "atomic compare-and-swap")
        return originals["create_atomic_cas"](self, ptr, *rest)

    _interp.GridExecutor.__call__ = checked_launch
    builder.create_masked_load, builder.create_masked_store = load, store
    builder.create_atomic_rmw, builder.create_atomic_cas = atomic_rmw, atomic_cas
    try:
        yield
    finally:
        _interp.GridExecutor.__call__ = launch
        for name, fn in originals.items():
            setattr(builder, name, fn)


def checked_where_possible():
    """bounds_checked() where the interpreter's hooks exist, no checking elsewhere."""
    return bounds_checked() if AVAILABLE else contextlib.nullcontext()


def rerun_under_interpreter(test_file: str, flag: str, timeout: int = 900) -> None:
    """Run test_file in a fresh pytest process with TRITON_INTERPRET=1 and the environment variable `flag` set
    (the file skips this call there) and assert its tests pass: TRITON_INTERPRET only takes effect for kernels
    imported after it is set, and another test module may have imported them first."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{flag: "1"})
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(test_file)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
