"""Whole conversions: streamed layer by layer equals the model converted whole, for every family and transform, the
real SmolLM2 as a folder and a GGUF, and Gemma end to end (winaconv/convert/pipeline.py)."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from winaconv.convert import ConvertOptions, convert
from winaconv.convert.transform import available_transforms
from winaconv_runtime.architectures import family_for_model_type

from budgets import GEMMA_TINY, SMOLLM2_BUDGET, TINY_OPTIONS
from models import ALL_FAMILIES, CALIB_TEXT, GEMMA_FAMILIES, random_model
from support import assert_same_checkpoint, max_relative_error, run_cli


@pytest.mark.parametrize("transform", [None, "exact"])
@pytest.mark.parametrize("family", GEMMA_FAMILIES)
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


def _convert(source, out, **options):
    calib = Path(out).parent / "calib.txt"
    calib.write_text(CALIB_TEXT)
    values = dict(TINY_OPTIONS, method="wina", calib_file=str(calib), device="cpu", max_shard_size="200KB")
    values.update(options)
    return convert(ConvertOptions(model=str(source), out=out, **values), say=lambda m: None)


CASES = [(family, kind) for family in ALL_FAMILIES
         for kind in available_transforms(family_for_model_type(random_model(family).config.model_type))]


@pytest.mark.parametrize("family,kind", CASES)
def test_streamed_conversion_equals_the_whole_model_one(tiny_folder, tmp_path, family, kind):
    source = tiny_folder(family)
    _convert(source, tmp_path / "streamed", transform=kind)
    _convert(source, tmp_path / "whole", transform=kind, in_memory=True)
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "whole")
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) > 1  # sharded, with its index


def test_streamed_divergence_allocation_and_sparse_upstream_equal_the_whole_model_ones(tiny_folder, tmp_path):
    """The divergence allocation replays the converted layers, read back from the shards being written."""
    options = dict(transform="pca", layer_allocation="divergence", upstream="sparse")
    _convert(tiny_folder("qwen2"), tmp_path / "streamed", **options)
    _convert(tiny_folder("qwen2"), tmp_path / "whole", in_memory=True, **options)
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "whole")


SMOLLM2_SHARDED = dict(SMOLLM2_BUDGET, max_shard_size="100MB")


@pytest.fixture(scope="module")
def streamed_smollm2(smollm2_folder, tmp_path_factory):
    """The real SmolLM2 folder converted layer by layer (sharded, default transform pca), once per module."""
    out = tmp_path_factory.mktemp("streamed") / "pca"
    _convert(smollm2_folder, out, transform="pca", **SMOLLM2_SHARDED)
    return out


@pytest.mark.slow
def test_streamed_smollm2_folder_equals_the_whole_model_one(smollm2_folder, streamed_smollm2):
    """The default transform on the real model (every transform is compared so on every family's tiny model)."""
    whole = streamed_smollm2.with_name("whole")  # beside it: the same calibration file, so the same settings
    _convert(smollm2_folder, whole, transform="pca", in_memory=True, **SMOLLM2_SHARDED)
    assert_same_checkpoint(streamed_smollm2, whole)


@pytest.mark.slow
def test_streamed_smollm2_gguf_equals_its_transformers_export(smollm2_gguf_path, streamed_smollm2):
    """GGUF tensors are dequantized one at a time, and q/k reordered by transformers' own processor: the
    streamed conversion of the GGUF equals, bit for bit, that of the folder transformers' whole-model GGUF
    loader exported (winaconv.testing.export_gguf_as_folder, the smollm2_folder fixture)."""
    gguf = streamed_smollm2.with_name("gguf")
    _convert(smollm2_gguf_path, gguf, transform="pca", **SMOLLM2_SHARDED)
    assert_same_checkpoint(gguf, streamed_smollm2, other_source=True)
