"""The CPU row-gather path (runtime/cpu_kernels.py) against the float64 masked reference, the policy
that picks it, and a converted SmolLM2 whose logits through it equal the masked dense path's."""

import importlib
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from winaconv_runtime import cpu_kernels, sparse_linear
from winaconv_runtime.sparse_linear import SparseLinear

from support import masked_product_float64

# (in, segment sizes): the odd shapes of the issue, and fused segments with their own thresholds
SHAPES = [(576, (1536,)), (1000, (3000,)), (576, (576, 192, 192)), (1000, (700, 1300))]
SPARSITIES = (0.0, 0.5, 0.9)


def make_case(in_features, segments, tokens, sparsity, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=g).to(dtype)
    weight = (torch.randn(sum(segments), in_features, generator=g) / math.sqrt(in_features)).to(dtype)
    bias = torch.randn(sum(segments), generator=g).to(dtype)
    q = torch.quantile(x.float().abs().flatten(), sparsity).item() if sparsity > 0 else 0.0
    tau = q * 2 * torch.rand(len(segments), in_features, generator=g)  # segments really differ
    tau[:, ::7] = float("inf")  # channels no input can keep
    return x, weight, bias, tau


def masked_reference(x, weight, bias, tau, segments):
    ends = torch.tensor(segments).cumsum(0).tolist()
    return masked_product_float64(x, weight.t(), tau, ends, bias)


def relative_error(y, reference):
    assert torch.isfinite(y).all()
    return float((y.double() - reference).norm() / reference.norm())


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
ALWAYS = cpu_kernels.GatherPlan(math.inf, 2)  # gather whatever it reads, two bags per token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features,segments", SHAPES)
def test_gather_equals_masked_reference(in_features, segments, dtype):
    for tokens in (1, 2, 3, 4):
        for sparsity in SPARSITIES:
            x, weight, bias, tau = make_case(in_features, segments, tokens, sparsity, dtype, seed=tokens)
            weight_t = weight.t().contiguous()
            ends = torch.tensor(segments).cumsum(0).tolist()
            rows = [weight_t[:, e - s:e] for s, e in zip(segments, ends)]  # column slices of one W^T
            y = cpu_kernels.sparse_linear_cpu(x, tau, rows, bias, ALWAYS)
            assert y.dtype == dtype and y.shape == (tokens, sum(segments))
            err = relative_error(y, masked_reference(x, weight, bias, tau, segments))
            assert err < TOLERANCE[dtype], (tokens, sparsity, err)


def test_every_threshold_infinite_gives_the_bias():
    for tokens in (1, 2):  # the one-token path and the general one
        x, weight, bias, tau = make_case(1000, (700, 1300), tokens, 0.5, torch.float32, seed=0)
        inf = torch.full_like(tau, float("inf"))
        y = cpu_kernels.sparse_linear_cpu(x, inf, [weight[:700].t(), weight[700:].t()], bias, ALWAYS)
        assert torch.equal(y, bias.expand(tokens, -1))


@pytest.mark.parametrize("bags", [1, 2, 3, 7])
def test_any_number_of_bags_gives_the_same_product(bags):
    """The kept channels are split into one bag per thread: any split, more bags than kept channels
    included, must give the masked product."""
    for tokens, sparsity in ((1, 0.5), (1, 0.995), (3, 0.5)):
        x, weight, bias, tau = make_case(576, (1536,), tokens, sparsity, torch.float32, seed=bags)
        plan = cpu_kernels.GatherPlan(math.inf, bags)  # one token: decode's own path; three: the general one
        y = cpu_kernels.sparse_linear_cpu(x, tau, [weight.t().contiguous()], bias, plan)
        assert relative_error(y, masked_reference(x, weight, bias, tau, (1536,))) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_linear_takes_the_gather_for_decode_and_dense_for_prefill(dtype, monkeypatch):
    in_features, segments = 1000, (700, 1300)
    x, weight, bias, tau = make_case(in_features, segments, 32, 0.9, dtype, seed=3)
    linear = SparseLinear(in_features, sum(segments), segment_sizes=segments, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    linear.set_thresholds([1.0, 1.0], [False, False])
    with torch.no_grad():
        linear.tau.copy_(tau)
    calls = []
    real_gather = sparse_linear.sparse_linear_cpu
    monkeypatch.setattr(sparse_linear, "sparse_linear_cpu", lambda *a: calls.append(1) or real_gather(*a))
    # this machine's measured plan for the shape, fixed here so the routing is the test's, not the machine's
    monkeypatch.setitem(cpu_kernels._plans, (in_features, sum(segments), dtype, max(1, torch.get_num_threads())),
                        cpu_kernels.GatherPlan(0.5, 2))
    reference = masked_reference(x, weight, bias, tau, segments)
    with torch.no_grad():
        decode = linear(x[:1])
        assert calls == [1], "batch-1 decode at 90% sparsity must take the row gather"
        prefill = linear(x)
        assert calls == [1], "a 32-token prefill must take the masked dense product"
    assert relative_error(decode, reference[:1]) < TOLERANCE[dtype]
    assert relative_error(prefill, reference) < TOLERANCE[dtype]
    # 6 of 7 channels kept: over the plan's 0.5 crossover, so the gather declines and the masked product runs
    with torch.no_grad():
        linear.tau.copy_(torch.where(torch.isinf(tau), tau, -1.0))
        declined = linear(x[:1])
    assert calls == [1, 1]
    reference = masked_reference(x[:1], weight, bias, linear.tau, segments)
    assert relative_error(declined, reference) < TOLERANCE[dtype]
    assert (dtype == torch.float32) == (linear.weight.stride(0) == 1), "fp32 keeps one copy, laid out as W^T"


def test_smollm2_logits_through_the_gather_equal_the_masked_dense_path(converted_smollm2, monkeypatch):
    folder = converted_smollm2("wina", "pca")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float64,
                                                 sparsity=0.5).eval()
    # the checkpoint's own copy of the runtime, as loaded through trust_remote_code
    package = type(model).__module__.rsplit(".", 1)[0]
    kernels = importlib.import_module(package + ".cpu_kernels")
    runtime_linear = importlib.import_module(package + ".sparse_linear")
    calls = []
    real_gather = runtime_linear.sparse_linear_cpu
    monkeypatch.setattr(runtime_linear, "sparse_linear_cpu", lambda *a: calls.append(1) or real_gather(*a))
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314, 253, 1345, 1789, 30]])

    def decode_logits():
        """Logits of the last 3 positions, decoded one by one after a 7-token prefill; and how many
        products of those decode steps took the gather."""
        with torch.no_grad():
            out = model(ids[:, :-3], use_cache=True)
            cache, steps = out.past_key_values, []
            calls.clear()
            for t in range(ids.shape[1] - 3, ids.shape[1]):
                out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits[:, -1].double())
        return torch.stack(steps), len(calls)

    # float64, the gather allowed for it: in float32 the two paths' last-bit differences move a channel
    # across its threshold now and then, and one such flip grows through 30 layers into a different
    # prediction; in float64 the products agree to ~1e-13 and no decision sits that close.
    monkeypatch.setattr(kernels, "GATHER_MODE", "always")  # every decode product gathered, float64 included
    gathered, gather_calls = decode_logits()
    assert gather_calls == 3 * model.config.num_hidden_layers * 7, "every decode product must take the row gather"
    monkeypatch.setattr(kernels, "GATHER_MODE", "never")  # every product masked dense
    masked, gather_calls = decode_logits()
    assert gather_calls == 0
    scale = masked.abs().max()
    assert (gathered - masked).abs().max() / scale < 1e-6
    model.set_sparsity(0)
    dense, _ = decode_logits()
    assert (dense - masked).abs().max() / scale > 1e-2, "sparsity 0.5 must change the logits"


def test_crossover_is_the_last_kept_fraction_where_the_gather_wins():
    fractions = (0.25, 0.5, 0.75, 1.0)
    assert cpu_kernels.crossover(fractions, [1, 2, 3, 4], dense_ms=5) == 1.0  # wins everywhere
    assert cpu_kernels.crossover(fractions, [6, 7, 8, 9], dense_ms=5) == 0.0  # never wins
    assert cpu_kernels.crossover(fractions, [1, 2, 4, 6], dense_ms=3) == pytest.approx(0.625)  # between 1/2 and 3/4
    assert cpu_kernels.crossover(fractions, [1, 2, 4, 2], dense_ms=3) == pytest.approx(0.625)  # the first loss ends it


def test_measured_plan_is_cached_per_shape_and_routes_the_product(monkeypatch):
    """The plan comes from timing this machine once per (shape, dtype, threads); a plan that never gathers sends
    decode to the masked dense product, one that always does sends it to the gather."""
    monkeypatch.setattr(cpu_kernels, "_plans", {})
    monkeypatch.setattr(cpu_kernels, "COLD_BYTES", 4 << 20)  # a quick measurement: the test is about its use
    measured = []
    real_measure = cpu_kernels.measure_gather_plan
    monkeypatch.setattr(cpu_kernels, "measure_gather_plan", lambda *a: measured.append(a) or real_measure(*a))
    plan = cpu_kernels.gather_plan(300, 500, torch.float32)
    assert 0.0 <= plan.max_row_fraction <= 1.0 and plan.bags in {1, max(1, torch.get_num_threads())}
    assert cpu_kernels.gather_plan(300, 500, torch.float32) is plan and len(measured) == 1
    cpu_kernels.gather_plan(300, 500, torch.bfloat16)
    assert len(measured) == 2

    x, weight, bias, tau = make_case(300, (500,), 1, 0.5, torch.float32, seed=5)
    linear = SparseLinear(300, 500)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    linear.set_thresholds([1.0], [False])
    with torch.no_grad():
        linear.tau.copy_(tau)
    calls = []
    real_gather = sparse_linear.sparse_linear_cpu
    monkeypatch.setattr(sparse_linear, "sparse_linear_cpu", lambda *a: calls.append(1) or real_gather(*a))
    reference = masked_reference(x, weight, bias, tau, (500,))
    key = (300, 500, torch.float32, max(1, torch.get_num_threads()))
    for plan, gathered in ((cpu_kernels.GatherPlan(0.0, 1), 0), (cpu_kernels.GatherPlan(1.0, 1), 1)):
        cpu_kernels._plans[key] = plan
        calls.clear()
        with torch.no_grad():
            y = linear(x)
        assert len(calls) == gathered
        assert relative_error(y, reference) < TOLERANCE[torch.float32]
