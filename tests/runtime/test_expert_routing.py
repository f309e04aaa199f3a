"""The one-launch MoE routing (runtime/expert_routing.py) under TRITON_INTERPRET=1: against a float64 reference
on odd widths, and inside a random model of every MoE family, where each router must give its own forward's
experts and weights and generate() transformers' tokens.

TRITON_INTERPRET must be set before the kernels are imported; if another test module imported them first, the
in-process tests are skipped and one test runs this file again in a fresh subprocess.
"""
import os
import warnings

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GenerationMixin  # noqa: E402

from winaconv_runtime import expert_routing as ER  # noqa: E402

from interpreter_bounds import checked_where_possible, rerun_under_interpreter  # noqa: E402
from models import MOE_FAMILIES, random_moe  # noqa: E402

_INTERPRETED = ER.HAS_TRITON and type(ER._route_kernel).__name__ == "InterpretedFunction"
needs_interp = pytest.mark.skipif(not _INTERPRETED, reason="triton missing, or imported before TRITON_INTERPRET=1 "
                                  "(covered by test_expert_routing_in_fresh_subprocess)")


def _distinct_logits(rows, experts, dtype, seed):
    """Logits without ties in `dtype` (ties make the order of equal experts a convention, tested apart)."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(experts, generator=g) for _ in range(rows)])
    return (ranks.double() * (6.0 / experts) - 3.0).to(dtype)


@needs_interp
@pytest.mark.parametrize("rows,experts,top_k", [(1, 128, 8), (3, 60, 4), (5, 7, 2), (2, 9, 9), (4, 1, 1)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_routing_equals_the_float64_reference(rows, experts, top_k, normalize, dtype):
    logits = _distinct_logits(rows, experts, dtype, seed=rows * experts + top_k)
    with checked_where_possible():
        scores, indices = ER.route(logits, top_k, normalize)
    expected_scores, expected_indices = ER.route_reference(logits, top_k, normalize)
    assert torch.equal(indices, expected_indices)
    assert scores.dtype == dtype and indices.dtype == torch.int64
    rounding = {torch.float64: 1e-6, torch.float32: 1e-6, torch.bfloat16: 2 ** -8}[dtype]
    assert (scores.double() - expected_scores).abs().max() <= rounding


@needs_interp
@pytest.mark.parametrize("rows,experts,hidden,top_k", [(1, 128, 300, 8), (3, 60, 37, 4), (8, 7, 513, 2), (2, 1, 16, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_and_routing_in_one_launch_keep_the_rule(rows, experts, hidden, top_k, dtype):
    """The router's product (float64 reference, rounded to the dtype as F.linear's output is) and the routing
    from those logits, exactly as `route` gives it; twice, so the reset tickets serve the next launch."""
    g = torch.Generator().manual_seed(rows * experts + hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    weight = (torch.randn(experts, hidden, generator=g) / hidden ** 0.5).to(dtype)
    for _ in range(2):
        with checked_where_possible():
            logits, scores, indices = ER.router_and_route(x, weight, top_k, normalize=True)
        product = x.double() @ weight.double().t()
        ulp = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7}[dtype]
        assert logits.dtype == dtype and (logits.double() - product).abs().max() <= ulp * product.abs().max() + 1e-6
        expected_scores, expected_indices = ER.route(logits, top_k, normalize=True)
        assert torch.equal(indices, expected_indices) and torch.equal(scores, expected_scores)


@needs_interp
def test_equal_probabilities_go_to_the_lower_expert_and_scores_can_stay_float32():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]], dtype=torch.bfloat16)
    scores, indices = ER.route(logits, 2, normalize=True, scores_dtype=torch.float32)
    assert indices.tolist() == [[1, 2], [0, 1]]
    assert scores.dtype == torch.float32 and torch.equal(scores, torch.full((2, 2), 0.5))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="top_k"):
        ER.route(torch.zeros(2, 4), 5, True)
    with pytest.raises(ValueError, match="logits"):
        ER.route(torch.zeros(2, 3, 4), 1, True)


@needs_interp
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_router_keeps_its_experts_and_generate_keeps_transformers_tokens(family, monkeypatch):
    model = random_moe(family, seed=3)
    prompt = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    routers = [layer.mlp.gate for layer in model.model.layers]
    prefill = torch.randn(ER.FUSED_MAX_TOKENS + 1, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    step = prefill[:3]  # a decode-sized batch: the router's product in the routing launch
    expected = [(router(prefill), router(step)) for router in routers]
    tokens = _greedy(model, prompt)
    calls = {"route": [], "router_and_route": []}
    for name, kernel in ((name, getattr(ER, name)) for name in calls):
        monkeypatch.setattr(ER, name, lambda *a, _k=kernel, _n=name, **k: calls[_n].append(1) or _k(*a, **k))
    assert ER.install(model) == len(routers) and ER.install(model) == len(routers)  # idempotent
    for router, ((logits, scores, indices), (step_logits, step_scores, step_indices)) in zip(routers, expected):
        got_logits, got_scores, got_indices = router(prefill)
        assert torch.equal(got_logits, logits) and torch.equal(got_indices, indices)
        assert got_scores.dtype == scores.dtype and (got_scores - scores).abs().max() <= 1e-6
        got_logits, got_scores, got_indices = router(step)  # the product summed in another order
        assert (got_logits - step_logits).abs().max() <= 1e-5 and torch.equal(got_indices, step_indices)
        assert got_scores.dtype == step_scores.dtype and (got_scores - step_scores).abs().max() <= 1e-5
    assert torch.equal(_greedy(model, prompt), tokens)
    assert len(calls["route"]) == 2 * len(routers)  # the routers' and the prompt's (14 tokens) routing
    assert len(calls["router_and_route"]) == len(routers) * 6  # the routers' step and generate's five steps


def _greedy(model, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GenerationMixin.generate(model, prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                        do_sample=False, pad_token_id=0, cache_implementation="static")



@pytest.mark.skipif(_INTERPRETED or os.environ.get("WINACONV_EXPERT_ROUTING_SUBPROCESS") == "1"
                    or not ER.HAS_TRITON, reason="the in-process tests run under the interpreter")
def test_expert_routing_in_fresh_subprocess():
    rerun_under_interpreter(__file__, "WINACONV_EXPERT_ROUTING_SUBPROCESS")
