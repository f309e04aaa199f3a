"""The single-token attention kernel (runtime/decode_attention.py) under TRITON_INTERPRET=1: against a float64
reference on odd shapes with every memory access bounds-checked, and inside the models of every family, where
the one-token steps must give sdpa's logits and generate() transformers' tokens.

TRITON_INTERPRET must be set before the kernels are imported; if another test module imported them first, the
in-process tests are skipped and one test runs this file again in a fresh subprocess.
"""
import os
import warnings

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GenerationMixin, StaticCache  # noqa: E402

from winaconv_runtime import decode_attention as DA  # noqa: E402

from interpreter_bounds import checked_where_possible, rerun_under_interpreter  # noqa: E402
from models import ALL_FAMILIES, random_model  # noqa: E402

_INTERPRETED = DA.HAS_TRITON and type(DA._decode_attention_partial_kernel).__name__ == "InterpretedFunction"
needs_interp = pytest.mark.skipif(not _INTERPRETED, reason="triton missing, or imported before TRITON_INTERPRET=1 "
                                  "(covered by test_decode_attention_in_fresh_subprocess)")

# (batch, heads, key/value heads, cache length, head dim)
SHAPES = [(1, 8, 2, 37, 24), (3, 6, 3, 70, 16), (2, 4, 4, 5, 80), (1, 12, 4, 129, 64)]


def _inputs(batch, heads, kv_heads, length, dim, mask_kind, seed):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, 1, dim, generator=g)
    key = torch.randn(batch, kv_heads, length, dim, generator=g)
    value = torch.randn(batch, kv_heads, length, dim, generator=g)
    keep = torch.rand(batch, 1, 1, length, generator=g) > 0.4
    keep[..., -1] = True  # every row attends somewhere
    keep[-1, ..., : length // 2] = False  # a long masked run (a whole cache slice for the longer shapes)
    mask = {"none": None, "bool": keep, "additive": torch.where(keep, 0.0, float("-inf")),
            "shared": keep[:1]}[mask_kind]
    return query, key, value, mask


@needs_interp
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "shared"])
def test_kernel_equals_the_float64_reference(shape, mask_kind):
    query, key, value, mask = _inputs(*shape, mask_kind, seed=sum(shape))
    query = query.transpose(1, 2).contiguous().transpose(1, 2)  # the strides q_proj(...).view().transpose() gives
    checked = checked_where_possible()
    with checked:
        out = DA.decode_attention(query, key, value, mask, scale=0.7)
    reference = DA.decode_attention_reference(query, key, value, mask, 0.7)
    assert out.shape == (shape[0], 1, shape[1], shape[4]) and out.dtype == query.dtype
    assert (out.double() - reference).abs().max() <= 1e-5


@needs_interp
def test_kernel_in_bfloat16_is_within_its_rounding():
    query, key, value, mask = _inputs(2, 8, 2, 45, 64, "bool", seed=3)
    out = DA.decode_attention(query.bfloat16(), key.bfloat16(), value.bfloat16(), mask, scale=0.125)
    reference = DA.decode_attention_reference(query.bfloat16(), key.bfloat16(), value.bfloat16(), mask, 0.125)
    assert (out.double() - reference).abs().max() <= 2 ** -7 * reference.abs().max()


def test_calls_the_kernel_cannot_take_go_to_sdpa():
    query, key, value, mask = _inputs(1, 4, 2, 9, 16, "bool", seed=0)
    assert not DA.handles(torch.cat([query, query], 2), key, value, None, {})  # two query tokens (prefill)
    assert not DA.handles(query, key, value, mask, {"softcap": 30.0})  # Gemma 2's soft-capped scores
    assert not DA.handles(query, key, value, mask, {"s_aux": torch.zeros(4)})  # attention sinks
    assert not DA.handles(query, key, value, mask.expand(1, 4, 1, 9), {})  # a mask per head


@needs_interp
@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_one_token_steps_give_sdpa_logits_and_generate_gives_transformers_tokens(family, monkeypatch):
    calls = []
    kernel = DA.decode_attention
    monkeypatch.setattr(DA, "decode_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    model = random_model(family)
    prompt = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    before = model.config._attn_implementation
    expected = _one_token_logits(model, prompt)
    tokens = _greedy(model, prompt)
    if before != "sdpa":  # Gemma 2 attends eagerly (soft-capped scores): install leaves it so
        assert not DA.install(model) and model.config._attn_implementation == before
        return
    assert DA.install(model) and model.config._attn_implementation == DA.IMPLEMENTATION
    got = _one_token_logits(model, prompt)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert torch.equal(_greedy(model, prompt), tokens)
    assert len(calls) >= 2 * model.config.num_hidden_layers  # the kernel ran, in both loops' one-token steps


def _one_token_logits(model, prompt):
    """Logits of one token after the prompt, on a static cache longer than the sequence (masked tail)."""
    cache = StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
        step = prompt[:, -1:]
        position = torch.tensor([prompt.shape[1]])
        return model(step, past_key_values=cache, cache_position=position, use_cache=True).logits


def _greedy(model, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GenerationMixin.generate(model, prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                        do_sample=False, pad_token_id=0, cache_implementation="static")



@pytest.mark.skipif(_INTERPRETED or os.environ.get("WINACONV_DECODE_ATTENTION_SUBPROCESS") == "1"
                    or not DA.HAS_TRITON, reason="the in-process tests run under the interpreter")
def test_decode_attention_in_fresh_subprocess():
    rerun_under_interpreter(__file__, "WINACONV_DECODE_ATTENTION_SUBPROCESS")
