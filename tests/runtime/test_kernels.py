"""CPU tests of runtime/kernels.py: the torch reference and the Triton kernels under TRITON_INTERPRET=1.

Run: python -m pytest tests/runtime/test_kernels.py -q

TRITON_INTERPRET must be set before runtime/kernels.py is imported (triton.jit decides between the
compiled and the interpreted kernel at decoration time).  It is set at the top of this module; if
another test module imported runtime.kernels before (without it), the in-process kernel tests are
skipped and one test re-runs this file in a fresh subprocess with the variable set instead.
"""
import math
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402
import torch  # noqa: E402

from winaconv_runtime import kernels as K  # noqa: E402

from interpreter_bounds import rerun_under_interpreter  # noqa: E402
from support import masked_product_float64  # noqa: E402

_INTERPRETED = K.HAS_TRITON and type(getattr(K, "_wina_tile_kernel", None)).__name__ == "InterpretedFunction"
_IN_SUBPROCESS = os.environ.get("WINACONV_KERNEL_TEST_SUBPROCESS") == "1"
needs_interp = pytest.mark.skipif(
    not _INTERPRETED,
    reason="triton missing, or runtime.kernels was imported before TRITON_INTERPRET=1 was set "
           "(covered by test_kernels_in_fresh_subprocess)")

# (in_features, segment_ends): odd shapes, fused segments, > 4 segments (two launches)
SHAPES = [
    (576, (1536,)),
    (1000, (3000,)),
    (576, (576, 768, 960)),
    (1536, (1536, 3072)),
    (300, (100, 200, 300, 400, 500, 650)),
]
# (sparsity, bias): every check draws fresh random inputs
SP_BIAS = [(0.0, True), (0.5, False), (0.9, True)]
# (tokens, sparsity, bias) for the (slow) interpreter runs
T_SP_BIAS = [(1, 0.0, True), (2, 0.5, False), (5, 0.9, True), (8, 0.5, True), (1, 0.9, False)]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _make(in_f, ends, T, sparsity, dtype, bias, seed, inf_every=7):
    g = _gen(seed)
    n_out = ends[-1]
    x = torch.randn(T, in_f, generator=g).to(dtype)
    w = (torch.randn(in_f, n_out, generator=g) / math.sqrt(in_f)).to(dtype)
    ax = x.float().abs().flatten()
    if sparsity > 0:
        q = torch.quantile(ax, sparsity)
        # per segment, per channel thresholds around the quantile, so segments really differ
        tau = q * 2 * torch.rand(len(ends), in_f, generator=g)
    else:
        tau = torch.zeros(len(ends), in_f)
    if inf_every:
        tau[:, ::inf_every] = float("inf")
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    return x, w, tau.float(), b


def _rel(y, r):
    assert torch.isfinite(y).all(), "non-finite output (unwritten or poisoned element)"
    return float((y.double() - r).norm() / r.norm().clamp_min(1e-30))


def _tol(dtype):
    return 1e-5 if dtype == torch.float32 else 1e-2


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every buffer the kernels allocate (torch.empty in runtime/kernels.py) is poisoned: floating ones NaN, so an
    output (or partial-sum workspace) element the kernel forgets to write shows up as NaN; integer ones (kept-row
    lists) a huge index, so reading an entry the kernel did not write is an access outside every tensor. Only
    that module sees the poisoning torch; torch itself is untouched."""

    class PoisoningTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def empty(*a, **k):
            t = torch.empty(*a, **k)
            if t.is_floating_point():
                t.fill_(float("nan"))
            elif t.dtype == torch.int32:
                t.fill_(1 << 30)
            return t

    monkeypatch.setattr(K, "torch", PoisoningTorch())
    yield


# ----------------------------------------------------------------------------------------------
# reference (no triton needed)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,ends", SHAPES)
def test_reference_matches_float64(in_f, ends, dtype):
    seed = 100
    for T in (1, 3, 8):
        for sp, bias in SP_BIAS:
            seed += 1
            x, w, tau, b = _make(in_f, ends, T, sp, dtype, bias, seed)
            y = K.sparse_linear_reference(x, w, tau, ends, b)
            assert y.dtype == dtype and y.shape == (T, ends[-1])
            assert _rel(y, masked_product_float64(x, w, tau, ends, b)) < _tol(dtype)


def test_reference_rule_edges():
    x = torch.tensor([[0.0, 1.0, -2.0, 3.0]])
    w = torch.eye(4)
    # all-zero tau keeps every nonzero channel; +inf drops always; strict '>' at equality
    tau = torch.tensor([[0.0, 0.0, 2.0, float("inf")]])
    y = K.sparse_linear_reference(x, w, tau, (4,))
    assert y.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_argument_checks():
    x = torch.randn(1, 8)
    w = torch.randn(8, 6)
    with pytest.raises(ValueError):
        K.sparse_linear_reference(x, w, torch.zeros(1, 8), (5,))          # ends must reach out
    with pytest.raises(ValueError):
        K.sparse_linear_reference(x, w, torch.zeros(1, 8), (3, 6))        # tau rows != segments
    with pytest.raises(ValueError):
        K.sparse_linear_reference(x, w, torch.zeros(2, 8), (4, 4, 6)[:2])  # not increasing to out


def test_use_sparse_kernel_policy():
    assert K.use_sparse_kernel(1, 4096, 4096) is True
    assert K.use_sparse_kernel(1, 14336, 4096) is True
    for T in (2, 4, 8, 64):
        assert K.use_sparse_kernel(T, 4096, 4096) is False
    assert K.use_sparse_kernel(1, 64, 64) is False


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# ----------------------------------------------------------------------------------------------
@needs_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_f,ends", SHAPES)
def test_triton_matches_float64(in_f, ends, dtype, poisoned_empty):
    seed = 1000 + 17 * len(ends) + in_f
    for T, sp, bias in T_SP_BIAS:
        seed += 1
        x, w, tau, b = _make(in_f, ends, T, sp, dtype, bias, seed)
        y = K.sparse_linear_triton(x, w, tau, ends, b)
        assert y.dtype == dtype and y.shape == (T, ends[-1])
        err = _rel(y, masked_product_float64(x, w, tau, ends, b))
        assert err < _tol(dtype), (T, sp, bias, err)


if K.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(src_ptr, dst_ptr, n, overrun, BLOCK: tl.constexpr):
        """dst[i] = src[i] for i < n + overrun: overrun > 0 writes past the end of dst."""
        offs = tl.arange(0, BLOCK)
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=offs < n, other=0.0), mask=offs < n + overrun)


@needs_interp
def test_bounds_check_catches_out_of_bounds_stores():
    """The conftest's interpreter bounds check (active in every test) is what makes the kernel tests
    memory-safe: one element past a tensor, or past a view into a larger tensor, is an error."""
    src = torch.arange(10, dtype=torch.float32)
    dst = torch.zeros(10)
    _copy_kernel[(1,)](src, dst, 10, 0, BLOCK=16)
    assert torch.equal(dst, src)
    with pytest.raises(Exception, match="outside every tensor argument"):
        _copy_kernel[(1,)](src, dst, 10, 1, BLOCK=16)
    whole = torch.zeros(20)
    with pytest.raises(Exception, match="outside every tensor argument"):
        _copy_kernel[(1,)](src, whole[:10], 10, 1, BLOCK=16)  # element 10 is in `whole`, not the view
    assert float(whole[10]) == 0.0, "the offending store must not have happened"


CONFIGS = [
    K.KernelConfig(block_n=64, block_k=128),             # split-K + reduce launch, T=1 FMA path
    K.KernelConfig(block_n=64, block_k=64, iters=2),     # two sub-tiles per program
    K.KernelConfig(block_n=128, block_k=1024),           # one K split: direct store
    K.KernelConfig(block_n=64, block_k=128, fused_reduce=True),  # split-K, the last program of a block reduces
    # kept-list kind (one token; more tokens take the tile): reduce launch, and the last program's ticket reduce
    K.KernelConfig(kind="list", block_n=64, block_k=16, groups=3, num_stages=2),
    K.KernelConfig(kind="list", block_n=128, block_k=32, groups=5, num_stages=3, fused_reduce=True, evict_first=True),
] if K.HAS_TRITON else []


def _config_id(c):
    return f"{c.kind}-n{c.block_n}k{c.block_k}i{c.iters}g{c.groups}{'f' if c.fused_reduce else ''}"


@needs_interp
def test_tickets_are_back_at_zero_after_fused_reductions():
    """A fused reduction leaves every ticket at zero, whatever the kind, batch or number of launches."""
    for cfg in (c for c in CONFIGS if c.fused_reduce):
        for T in (1, 3):
            x, w, tau, b = _make(300, (100, 200, 300, 400, 500, 650), T, 0.5, torch.float32, True, 31 + T)
            K.launch(x, w, tau, (100, 200, 300, 400, 500, 650), b, cfg)
            assert int(K.reduction_tickets(x.device).abs().sum()) == 0, (cfg, T)


@needs_interp
@pytest.mark.parametrize("cfg", CONFIGS, ids=_config_id)
def test_triton_configs(cfg, poisoned_empty):
    seed = 5000
    for in_f, ends in [(333, (64, 200, 451)), (300, (100, 200, 300, 400, 500, 650))]:
        for T, dtype in ((1, torch.float32), (3, torch.bfloat16), (1, torch.bfloat16), (8, torch.float32)):
            seed += 1
            if cfg.kind == "list" and T > 1:  # more tokens take the tile kernel with these block sizes: untested
                continue                      # sizes nothing chooses, and the slowest cases under the interpreter
            x, w, tau, b = _make(in_f, ends, T, 0.5, dtype, True, seed)
            y = K.launch(x, w, tau, ends, b, cfg)
            if T == 1 and dtype == torch.bfloat16:  # a repeat on one case of each shape (the interpreter is slow)
                assert torch.equal(y, K.launch(x, w, tau, ends, b, cfg)), "not deterministic"
            assert _rel(y, masked_product_float64(x, w, tau, ends, b)) < _tol(dtype)


@needs_interp
def test_triton_inf_and_zero_thresholds(poisoned_empty):
    in_f, ends = 300, (100, 250, 400)
    x, w, _, b = _make(in_f, ends, 3, 0.0, torch.float32, True, 17)
    x[:, ::4] = 0.0
    # all-zero tau keeps every nonzero channel: the dense product
    y = K.sparse_linear_triton(x, w, torch.zeros(3, in_f), ends, b)
    assert _rel(y, x.double() @ w.double() + b.double()) < 1e-5
    # a segment with every threshold +inf: its columns are exactly the bias, the others untouched
    tau = torch.zeros(3, in_f)
    tau[1] = float("inf")
    y = K.sparse_linear_triton(x, w, tau, ends, b)
    assert torch.equal(y[:, 100:250], b[100:250].expand(3, -1))
    assert _rel(y, masked_product_float64(x, w, tau, ends, b)) < 1e-5
    # everything dropped, no bias: exact zeros (no partial is read unwritten)
    y = K.sparse_linear_triton(x, w, torch.full((3, in_f), float("inf")), ends)
    assert torch.equal(y, torch.zeros_like(y))


@needs_interp
@pytest.mark.parametrize("fused", [False, True])
def test_list_kind_edges(fused, poisoned_empty):
    """The kept-list kind with nothing kept (exactly the bias), everything kept, one segment of none; and
    the reduction tickets are all back at zero after every launch (the next launch counts from zero)."""
    cfg = K.KernelConfig(kind="list", block_n=64, block_k=16, groups=4, num_stages=2, fused_reduce=fused)
    in_f, ends = 301, (100, 250, 400)
    x, w, _, b = _make(in_f, ends, 1, 0.0, torch.float32, True, 23)
    x[:, ::5] = 0.0
    y = K.launch(x, w, torch.full((3, in_f), float("inf")), ends, b, cfg)
    assert torch.equal(y, b[None])
    y = K.launch(x, w, torch.zeros(3, in_f), ends, b, cfg)
    assert _rel(y, x.double() @ w.double() + b.double()) < 1e-5
    tau = torch.rand(3, in_f)
    tau[1] = float("inf")
    y = K.launch(x, w, tau, ends, None, cfg)
    assert torch.equal(y[:, 100:250], torch.zeros(1, 150))
    assert _rel(y, masked_product_float64(x, w, tau, ends, None)) < 1e-5
    if fused:
        assert int(K.reduction_tickets(x.device).abs().sum()) == 0


def test_kernel_kind_follows_the_kept_share(monkeypatch):
    """Batch 1: the tile kernel where a level keeps more than a quarter of the channels, the kept-list kind at
    or under it (the H200 sweep's crossover); batches always take the tensor-core tile."""
    monkeypatch.setattr(K, "_interpreting", lambda: False)
    for in_f, out_f in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        assert K.choose_config(1, in_f, out_f, 100).kind == "tile"
        assert K.choose_config(1, in_f, out_f, 50).kind == "tile"
        assert K.choose_config(1, in_f, out_f, K.LIST_KIND_MAX_KEPT_PERCENT).kind == "list"
        assert K.choose_config(1, in_f, out_f, 10).kind == "list"
        assert K.choose_config(4, in_f, out_f, 10).kind == "tile"


@needs_interp
def test_triton_more_than_16_tokens():
    in_f, ends = 300, (200, 450)
    x, w, tau, b = _make(in_f, ends, 19, 0.5, torch.float32, True, 11)
    y = K.sparse_linear_triton(x, w, tau, ends, b)
    assert _rel(y, masked_product_float64(x, w, tau, ends, b)) < 1e-5


@needs_interp
def test_compile_fullgraph_and_fake():
    in_f, ends = 300, (200, 450)
    x, w, tau, b = _make(in_f, ends, 2, 0.5, torch.float32, True, 13)

    def f(x):
        return K.sparse_linear_triton(x, w, tau, ends, b) * 2.0

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for seed, T in ((1, 1), (2, 4)):
        xi = torch.randn(T, in_f, generator=_gen(seed))
        assert _rel(cf(xi) / 2, masked_product_float64(xi, w, tau, ends, b)) < 1e-5
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fx = torch.empty(3, in_f, dtype=torch.bfloat16)
        fw = torch.empty(in_f, 450, dtype=torch.bfloat16)
        out = K.sparse_linear_triton(fx, fw, torch.empty(2, in_f), ends)
        assert out.shape == (3, 450) and out.dtype == torch.bfloat16


@pytest.mark.skipif(_INTERPRETED or _IN_SUBPROCESS or not K.HAS_TRITON,
                    reason="kernels already run in this process under the interpreter")
def test_kernels_in_fresh_subprocess():
    rerun_under_interpreter(__file__, "WINACONV_KERNEL_TEST_SUBPROCESS")


def test_a_model_folders_copy_of_the_runtime_reuses_the_ops_instead_of_redefining_them(tmp_path):
    """A checkpoint's copy of the runtime files, imported next to the package (trust_remote_code does that), must
    not define the ops again: torch would destroy the package's definitions, and the op handles the package holds
    would point at freed operators (CI failures far from their cause: std::bad_alloc, SIGSEGV, vector::reserve)."""
    import shutil

    shutil.copytree(os.path.join(_ROOT, "runtime"), tmp_path / "model_folder_runtime")
    script = f"""
import gc, importlib, sys
import torch
from torch._library import custom_ops
from winaconv_runtime import expert_kernels, kernels
version = expert_kernels._OP_VERSION
names = ("winaconv::sparse_linear_v3", f"winaconv::expert_gate_up_v{{version}}", f"winaconv::expert_down_v{{version}}")
libraries = [custom_ops.OPDEF_TO_LIB[n] for n in names]
sys.path.insert(0, {str(tmp_path)!r})
copy = importlib.import_module("model_folder_runtime.expert_kernels")
gc.collect()
assert copy.__file__ != expert_kernels.__file__
assert [custom_ops.OPDEF_TO_LIB[n] for n in names] == libraries, "a copy redefined the ops"
assert all(n in custom_ops.OPDEFS for n in names), "an op's definition was garbage-collected"
x, w = torch.randn(1, 64), torch.randn(64, 48)
tau = torch.zeros(1, 64)
assert torch.allclose(kernels.sparse_linear_triton(x, w, tau, [48]), kernels.sparse_linear_reference(x, w, tau, [48]),
                      atol=1e-4)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]
