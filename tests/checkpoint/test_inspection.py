"""winaconv inspect: a good checkpoint is described, every broken one is reported (winaconv/checkpoint/inspection.py)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from winaconv.cli import main
from winaconv_runtime.checkpoint_format import EXPERTS_FORMAT_VERSION, FORMAT_VERSION, safetensors_metadata

from support import assert_one_line_error, edit_config
from support import problem_lines as problems


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A fresh copy of a good checkpoint, to damage."""

    def make(transform="exact"):
        copy = tmp_path / f"broken-{transform}"
        shutil.copytree(checkpoints(transform), copy)
        return copy

    return make


def inspect(*args):
    return CliRunner().invoke(main, ["inspect", *map(str, args)], catch_exceptions=False)


def rewrite_weights(folder: Path, change, metadata=None) -> None:
    """Change the tensors of model.safetensors; its metadata is kept unless `metadata` is given."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata=safetensors_metadata(path) if metadata is None else metadata)


@pytest.mark.parametrize("transform", ["global", "exact"])
def test_good_checkpoint_passes_and_is_described(checkpoints, transform):
    folder = checkpoints(transform)
    result = inspect(folder)
    assert result.exit_code == 0, result.output
    assert not problems(result)
    out = result.stdout
    for text in (f"format version    {FORMAT_VERSION}", "example-org/tiny-llama", "wina", transform,
                 "0.25, 0.5 (default 0.5)", "sparsities at level 0.5", "mean"):
        assert text in out, out
    result = inspect(folder, "--sparsity", "0.25", "--thresholds")
    assert result.exit_code == 0 and "thresholds at level 0.25" in result.stdout


def test_exact_checkpoint_has_shortcuts_and_inspect_checks_them(broken):
    folder = broken("exact")
    names = load_file(folder / "model.safetensors").keys()
    assert {"model.layers.0.attn_shortcut", "model.layers.1.mlp_shortcut"} <= set(names)
    rewrite_weights(folder, lambda t: t.update({"model.layers.1.mlp_shortcut": torch.zeros(64, 32)}))
    result = inspect(folder)
    assert result.exit_code == 1
    assert problems(result) == [
        "problem: model.layers.1.mlp_shortcut: shape [64, 32] in model.safetensors, but the config expects [64, 64]"
    ]


def test_missing_tensor(broken):
    folder = broken()
    rewrite_weights(folder, lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    result = inspect(folder)
    assert result.exit_code == 1
    assert problems(result) == [
        "problem: model.layers.0.self_attn.k_proj.weight: missing (the config expects a tensor of shape [32, 64])"
    ]


def test_wrong_projection_shape_and_unexpected_tensor(broken):
    folder = broken()

    def change(t):
        t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 64)
        t["model.layers.1.extra.weight"] = torch.zeros(3)

    rewrite_weights(folder, change)
    found = problems(inspect(folder))
    assert len(found) == 2, found
    assert "model.layers.1.mlp.down_proj.weight: shape [64, 64]" in found[0] and "expects [64, 96]" in found[0]
    assert "model.layers.1.extra.weight: unexpected tensor" in found[1]


def test_config_and_weights_disagree(broken):
    """Shapes come from the config: a config claiming a wider MLP makes the stored tensors wrong."""
    folder = broken("global")
    edit_config(folder, lambda c: c.update(intermediate_size=128))
    found = problems(inspect(folder))
    assert len(found) == 6 and all("expects [" in line for line in found), found  # gate, up, down of 2 layers
    assert any("mlp.gate_proj.weight: shape [96, 64]" in line and "[128, 64]" in line for line in found)


def test_bad_format_versions(broken):
    folder = broken()
    edit_config(folder, lambda c: c["winaconv"].update(format_version=99))
    metadata = {**safetensors_metadata(folder / "model.safetensors"), "winaconv_format_version": "0"}
    rewrite_weights(folder, lambda t: None, metadata=metadata)
    found = problems(inspect(folder))
    assert found == [
        f"problem: config.json: winaconv format_version is 99; this winaconv reads {FORMAT_VERSION} "
        f"({EXPERTS_FORMAT_VERSION} with mixture-of-experts tables)",
        f"problem: model.safetensors: safetensors metadata winaconv_format_version is '0'; expected '{FORMAT_VERSION}'",
    ]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, "0.3"])
def test_non_finite_or_bad_threshold(broken, bad):
    folder = broken()
    text = (folder / "config.json").read_text()
    config = json.loads(text)
    config["winaconv"]["levels"]["0.5"]["thresholds"][1][4] = bad
    (folder / "config.json").write_text(json.dumps(config))  # json writes NaN / Infinity for non-finite floats
    found = problems(inspect(folder))
    assert len(found) == 1 and found[0].startswith("problem: config.json: level 0.5 layer 1 gate: threshold"), found


def test_sharded_checkpoint_with_missing_shard(broken, tmp_path):
    """An index whose shard is gone; and a shard that lost a tensor the index lists."""
    folder = broken()
    tensors = load_file(folder / "model.safetensors")
    metadata = safetensors_metadata(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    first, second = names[: len(names) // 2], names[len(names) // 2:]
    save_file({k: tensors[k] for k in first}, folder / "model-00001-of-00002.safetensors", metadata=metadata)
    save_file({k: tensors[k] for k in second}, folder / "model-00002-of-00002.safetensors", metadata=metadata)
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in first},
                  **{k: "model-00002-of-00002.safetensors" for k in second}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    result = inspect(folder)
    assert result.exit_code == 0, result.output
    assert "in 2 file(s)" in result.stdout

    (folder / "model-00002-of-00002.safetensors").unlink()
    found = problems(inspect(folder))
    assert found == ["problem: model-00002-of-00002.safetensors: listed in model.safetensors.index.json but missing"]


def test_missing_runtime_file_and_not_a_checkpoint(broken, tmp_path):
    folder = broken()
    (folder / "sparse_linear.py").unlink()
    assert problems(inspect(folder)) == ["problem: sparse_linear.py: runtime file missing (trust_remote_code needs it)"]
    edit_config(folder, lambda c: c.pop("winaconv"))
    result = inspect(folder)
    assert result.exit_code == 1
    assert problems(result) == ["problem: config.json: no 'winaconv' section (not a winaconv checkpoint)"]


def test_unknown_level_and_missing_folder_are_one_line_errors(checkpoints, tmp_path):
    result = inspect(checkpoints(), "--sparsity", "0.3")
    assert result.exit_code != 0 and result.output.strip().splitlines()[-1].startswith("Error: sparsity 0.3")
    assert_one_line_error(inspect(tmp_path / "nope"), "Error: checkpoint not found")


def test_hub_repo_offline_is_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert_one_line_error(inspect("some-org/some-model"), "HF_HUB_OFFLINE")
