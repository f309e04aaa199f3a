"""Gemma 2 and Gemma 3 text on small random models: the dense function is kept, rotations are refused
with one line, and a converted folder loads through trust_remote_code and decodes like the original."""

import copy

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from winaconv.calibrate import capture_layer_inputs, layer_outputs
from winaconv.cli import main
from winaconv.errors import WinaconvError
from winaconv.runtime_model import to_runtime_model, winaconv_section
from winaconv.transform import apply_transform, available_transforms
from winaconv_runtime.checkpoint_format import TRANSFORMS

from random_models import GEMMA_MODELS, random_gemma

FAMILIES = sorted(GEMMA_MODELS)
TINY = ["--calib-tokens", "128", "--seq-len", "16", "--greedy-tokens", "32", "--sparsity-levels", "0.25,0.5"]


def max_relative_error(out, ref) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def runtime_model(base, kind):
    model, family = to_runtime_model(copy.deepcopy(base), winaconv_section("wina", kind, ()))
    apply_transform(model, family, kind)
    return model, family


@pytest.mark.parametrize("family", FAMILIES)
def test_accepted_transforms_keep_logits(family):
    base = random_gemma(family)
    ids = torch.randint(0, base.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    _, fam = to_runtime_model(copy.deepcopy(base), winaconv_section("wina", "none", ()))
    accepted = available_transforms(fam)
    assert accepted == ("none",)
    with torch.no_grad():
        ref = base(ids).logits
        for kind in accepted:
            assert max_relative_error(runtime_model(base, kind)[0](ids).logits, ref) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_rotations_are_refused_in_one_line(family):
    model, fam = to_runtime_model(random_gemma(family), winaconv_section("wina", "none", ()))
    for kind in set(TRANSFORMS) - set(available_transforms(fam)):
        with pytest.raises(WinaconvError) as caught:
            apply_transform(model, fam, kind)
        message = str(caught.value)
        assert "\n" not in message and f"'{kind}'" in message and message.endswith("available: none")


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_replays_each_layer_with_its_own_mask(family):
    """Layer by layer with the captured per-layer arguments gives the model's own last hidden state:
    sliding-window and global layers get their own masks (and, for Gemma 3, rotary tables)."""
    model, _ = runtime_model(random_gemma(family), "none")
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


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """Random Gemma folders with the SmolLM2 tokenizer, and a calibration text file."""
    from transformers import AutoTokenizer

    from conftest import smollm2_gguf
    from winaconv.calibration_data import builtin_texts

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    root = tmp_path_factory.mktemp("gemma")
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(builtin_texts()[:10]))
    made = {}

    def make(family):
        if family not in made:
            model = random_gemma(family)
            model.resize_token_embeddings(len(tokenizer))
            folder = root / family
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[family] = folder
        return made[family], calib

    return make


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_refuses_rotations_in_one_line(tiny_gemma, tmp_path, family):
    source, calib = tiny_gemma(family)
    out = tmp_path / "out"
    result = run("convert", source, "--out", out, "--calib-file", calib, "--device", "cpu", "--transform", "pca", *TINY)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert lines[0].startswith("Error:") and "available: none" in lines[0]
    assert not out.exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_folder_loads_and_generates_like_the_original(tiny_gemma, tmp_path, family):
    import json

    source, calib = tiny_gemma(family)
    out = tmp_path / "ckpt"
    result = run("convert", source, "--out", out, "--calib-file", calib, "--device", "cpu", *TINY)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["winaconv"]["transform"] == "none"  # the family default

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
    inspected = run("inspect", out)
    assert inspected.exit_code == 0 and "problem" not in inspected.output, inspected.output
    plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)  # transform none: a plain model
    assert type(plain) is type(original) and not any(v for k, v in info.items() if k != "error_msgs")
