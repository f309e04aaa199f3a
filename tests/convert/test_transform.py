"""The transforms fold into the weights losslessly: logits kept for every family and transform, the bases they promise,
and refusals where a family cannot take one (winaconv/convert/transform.py)."""

import copy

import pytest
import torch

from winaconv.convert.runtime_model import to_runtime_model, winaconv_section
from winaconv.convert.transform import TRANSFORMS, apply_transform, available_transforms
from winaconv.errors import WinaconvError
from winaconv_runtime.architectures import projection_sizes

from budgets import GEMMA_TINY
from models import FAMILY_MODELS, GEMMA_FAMILIES, calibration_ids, random_model, transformed
from support import assert_one_line_error, max_relative_error, run_cli


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


def test_pca_transform_decorrelates_the_normed_residual_stream():
    """After the pca rotation, the calibration text's normed residual stream has a diagonal
    covariance, largest variance first: the basis really is its principal components."""
    from winaconv.convert.transform import residual_covariance

    base = random_model("qwen2")
    model, _ = transformed(base, "pca")
    covariance = residual_covariance(model, calibration_ids(base.config), "cpu")
    variances = torch.diagonal(covariance)
    off_diagonal = covariance - torch.diag(variances)
    assert off_diagonal.abs().max() <= 1e-6 * variances.max()  # float32 weights after the rotation
    assert torch.all(variances[:-1] >= variances[1:] - 1e-6 * variances.max())
    before = residual_covariance(transformed(base, "global")[0], calibration_ids(base.config), "cpu")
    assert (before - torch.diag(torch.diagonal(before))).abs().max() > 1e-3 * torch.diagonal(before).max()


def test_pca_transform_needs_calibration_text():
    model, family = to_runtime_model(random_model("llama"), winaconv_section("wina", "pca", ()))
    with pytest.raises(ValueError, match="calibration"):
        apply_transform(model, family, "pca")


@pytest.mark.slow
@pytest.mark.parametrize("kind", TRANSFORMS)
def test_transform_keeps_smollm2_logits(smollm2_folder, kind):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = base(ids).logits
        model, family = to_runtime_model(base, winaconv_section("wina", kind, ()))  # shares base's tensors
        apply_transform(model, family, kind, calibration_ids=calibration_ids(base.config))
        out = model(ids).logits
    assert max_relative_error(out, ref) <= 1e-4




@pytest.mark.parametrize("family", GEMMA_FAMILIES)
def test_accepted_transforms_keep_logits(family):
    base = random_model(family)
    ids = torch.randint(0, base.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    _, fam = to_runtime_model(copy.deepcopy(base), winaconv_section("wina", "none", ()))
    accepted = available_transforms(fam)
    assert accepted == ("none", "exact")
    with torch.no_grad():
        ref = base(ids).logits
        for kind in accepted:
            assert max_relative_error(transformed(base, kind)[0](ids).logits, ref) <= 1e-4


@pytest.mark.parametrize("family", GEMMA_FAMILIES)
def test_exact_rotates_block_inputs_and_orthogonalizes_k_and_gate(family):
    base = random_model(family)
    model, _ = transformed(base, "exact")
    eye = torch.eye(model.config.hidden_size, dtype=torch.float64)
    for layer, original in zip(model.model.layers, base.model.layers):
        for weight in (layer.self_attn.k_proj.weight, layer.mlp.gate_proj.weight):
            gram = weight.double().T @ weight.double()
            assert (gram - torch.diag(torch.diagonal(gram))).abs().max() <= 1e-5 * gram.abs().max()
        for rotation in (layer.attn_input_rotation, layer.mlp_input_rotation):
            assert torch.allclose(rotation.double() @ rotation.double().T, eye, atol=1e-5)
            assert not torch.allclose(rotation.double(), eye, atol=1e-3)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            assert torch.equal(getattr(layer, norm).weight, getattr(original, norm).weight)  # norms untouched
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied


@pytest.mark.parametrize("family", GEMMA_FAMILIES)
def test_rotations_are_refused_in_one_line(family):
    model, fam = to_runtime_model(random_model(family), winaconv_section("wina", "none", ()))
    for kind in set(TRANSFORMS) - set(available_transforms(fam)):
        with pytest.raises(WinaconvError) as caught:
            apply_transform(model, fam, kind)
        message = str(caught.value)
        assert "\n" not in message and f"'{kind}'" in message and message.endswith("available: none, exact")


@pytest.mark.parametrize("family", GEMMA_FAMILIES)
def test_cli_refuses_rotations_in_one_line(tiny_folder, calib_file, tmp_path, family):
    out = tmp_path / "out"
    result = run_cli("convert", tiny_folder(family), "--out", out, "--calib-file", calib_file, "--device", "cpu",
                     "--transform", "pca", *GEMMA_TINY)
    assert_one_line_error(result, "available: none, exact")
    assert not out.exists()
