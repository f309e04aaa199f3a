"""Gemma 2 and Gemma 3 text on small random models: the dense function is kept (transforms none and
exact, whose rotations act on each block's input), rotations of the residual stream are refused with one
line, and a converted folder loads through trust_remote_code and decodes like the original."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from winaconv.convert.layers import capture_layer_inputs, layer_outputs
from winaconv.errors import WinaconvError
from winaconv.convert.runtime_model import to_runtime_model, winaconv_section
from winaconv.convert.transform import apply_transform, available_transforms
from winaconv_runtime.checkpoint_format import TRANSFORMS

from random_models import GEMMA_MODELS, random_model
from support import assert_one_line_error, run_cli

FAMILIES = sorted(GEMMA_MODELS)
GEMMA_TINY = ["--calib-tokens", "128", "--seq-len", "16", "--greedy-tokens", "32", "--sparsity-levels", "0.25,0.5"]


def max_relative_error(out, ref) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def runtime_model(base, kind):
    model, family = to_runtime_model(copy.deepcopy(base), winaconv_section("wina", kind, ()))
    apply_transform(model, family, kind)
    return model, family


@pytest.mark.parametrize("family", FAMILIES)
def test_accepted_transforms_keep_logits(family):
    base = random_model(family)
    ids = torch.randint(0, base.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    _, fam = to_runtime_model(copy.deepcopy(base), winaconv_section("wina", "none", ()))
    accepted = available_transforms(fam)
    assert accepted == ("none", "exact")
    with torch.no_grad():
        ref = base(ids).logits
        for kind in accepted:
            assert max_relative_error(runtime_model(base, kind)[0](ids).logits, ref) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_rotates_block_inputs_and_orthogonalizes_k_and_gate(family):
    base = random_model(family)
    model, _ = runtime_model(base, "exact")
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


@pytest.mark.parametrize("family", FAMILIES)
def test_rotations_are_refused_in_one_line(family):
    model, fam = to_runtime_model(random_model(family), winaconv_section("wina", "none", ()))
    for kind in set(TRANSFORMS) - set(available_transforms(fam)):
        with pytest.raises(WinaconvError) as caught:
            apply_transform(model, fam, kind)
        message = str(caught.value)
        assert "\n" not in message and f"'{kind}'" in message and message.endswith("available: none, exact")


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_replays_each_layer_with_its_own_mask(family):
    """Layer by layer with the captured per-layer arguments gives the model's own last hidden state:
    sliding-window and global layers get their own masks (and, for Gemma 3, rotary tables)."""
    model, _ = runtime_model(random_model(family), "none")
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden, per_layer = capture_layer_inputs(model, ids, "cpu")
        for layer, kwargs in zip(model.model.layers, per_layer):
            hidden = layer_outputs(layer, hidden, kwargs, "cpu", micro_batch=2)
        expected = model.model(ids).last_hidden_state
        replayed = model.model.norm(hidden)
        assert max_relative_error(replayed, expected) <= 1e-5
        # with the first layer's (sliding) arguments everywhere, the global layer would differ
        hidden = capture_layer_inputs(model, ids, "cpu")[0]
        for layer in model.model.layers:
            hidden = layer_outputs(layer, hidden, per_layer[0], "cpu", micro_batch=2)
        assert max_relative_error(model.model.norm(hidden), expected) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_refuses_rotations_in_one_line(tiny_folder, calib_file, tmp_path, family):
    out = tmp_path / "out"
    result = run_cli("convert", tiny_folder(family), "--out", out, "--calib-file", calib_file, "--device", "cpu",
                     "--transform", "pca", *GEMMA_TINY)
    assert_one_line_error(result, "available: none, exact")
    assert not out.exists()


@pytest.mark.parametrize("transform", [None, "exact"])
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_folder_loads_and_generates_like_the_original(tiny_folder, calib_file, tmp_path, family, transform):
    import json

    source = tiny_folder(family)
    out = tmp_path / "ckpt"
    chosen = [] if transform is None else ["--transform", transform]
    result = run_cli("convert", source, "--out", out, "--calib-file", calib_file, "--device", "cpu", *GEMMA_TINY, *chosen)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["winaconv"]["transform"] == (transform or "none")  # none: the family default

    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32, sparsity=0,
                                                       output_loading_info=True)
    model.eval()
    assert type(model).__module__.startswith("transformers_modules")
    assert not any(v for k, v in info.items() if k != "error_msgs"), info
    ids = torch.randint(0, 1000, (2, 14), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = original(ids).logits
        assert max_relative_error(model(ids).logits, expected) <= 1e-4
        prompt = ids[:1, :6]
        want = original.generate(prompt, max_new_tokens=12, do_sample=False)
        got = model.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(got, want)
        model.set_sparsity(0.5)
        assert max_relative_error(model(ids).logits, expected) > 1e-3, "sparsity 0.5 must change the logits"
    inspected = run_cli("inspect", out)
    assert inspected.exit_code == 0 and "problem" not in inspected.output, inspected.output
    if transform is None:  # transform none: a plain model of the family
        plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert type(plain) is type(original) and not any(v for k, v in info.items() if k != "error_msgs")
