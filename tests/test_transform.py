"""The orthogonalizing transforms are functionally lossless: same logits as the original model."""

import copy

import pytest
import torch

from winaconv.runtime_model import to_runtime_model, winaconv_section
from winaconv.transform import TRANSFORMS, apply_transform
from winaconv_runtime.architectures import projection_sizes

from random_models import FAMILY_MODELS, random_model


def max_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def transformed(base, kind):
    model, family = to_runtime_model(copy.deepcopy(base), winaconv_section("wina", kind, ()))
    apply_transform(model, family, kind)
    return model, family


@pytest.mark.parametrize("kind", TRANSFORMS)
@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_transform_keeps_logits(family, kind):
    base = random_model(family)
    ids = torch.randint(0, base.config.vocab_size, (2, 19))
    with torch.no_grad():
        ref = base(ids).logits
        out = transformed(base, kind)[0](ids).logits
    assert max_relative_error(out, ref) <= 1e-4


def test_exact_transform_orthogonalizes_k_and_gate_columns():
    model, family = transformed(random_model("llama"), "exact")
    sizes = projection_sizes(model.config)
    for layer in model.model.layers:
        for weight in (layer.self_attn.k_proj.weight, layer.mlp.gate_proj.weight):
            gram = weight.double().T @ weight.double()
            off_diagonal = gram - torch.diag(torch.diagonal(gram))
            assert off_diagonal.abs().max() <= 1e-5 * gram.abs().max()
        # the shortcut matrices are orthogonal, and the basis really changes between blocks
        for shortcut in (layer.attn_shortcut, layer.mlp_shortcut):
            eye = torch.eye(sizes["o"][1], dtype=torch.float64)
            assert torch.allclose(shortcut.double() @ shortcut.double().T, eye, atol=1e-5)
        assert not torch.allclose(layer.attn_shortcut.double(), torch.eye(sizes["o"][1], dtype=torch.float64), atol=1e-3)


def test_global_transform_unties_embeddings_and_sets_unit_norms():
    model, _ = transformed(random_model("llama"), "global")
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    for layer in model.model.layers:
        assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))


@pytest.mark.slow
@pytest.mark.parametrize("kind", TRANSFORMS)
def test_transform_keeps_smollm2_logits(smollm2_folder, kind):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(ids).logits
        model, family = to_runtime_model(base, winaconv_section("wina", kind, ()))  # shares base's tensors
        apply_transform(model, family, kind)
        out = model(ids).logits
    assert max_relative_error(out, ref) <= 1e-4
