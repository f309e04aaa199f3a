"""Loading a checkpoint or plain model for the commands: broken configs, pickles, mixed shards and implausible
thresholds are one-line errors (winaconv/use/loading.py)."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from budgets import TINY
from models import tiny_source
from support import assert_one_line_error, edit_config, eval_args, run_cli
from support import problem_lines as problems

run = run_cli


def test_eval_of_an_exact_checkpoint_never_prompts(tiny_folder, calib_file, tmp_path):
    """Case 5: its tokenizer was loaded without trust_remote_code, so transformers asked on stdout whether
    to run the folder's code: --json stopped parsing, and a terminal waited for input."""
    out = tmp_path / "ckpt"
    result = run("convert", tiny_folder("llama"), "--out", out, "--calib-file", calib_file, "--device", "cpu",
                 *TINY, "--transform", "exact")
    assert result.exit_code == 0, result.output
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(["The quick brown fox jumps over the lazy dog."] * 40))
    done = subprocess.run([sys.executable, "-m", "winaconv.cli", "eval", str(out), "--text-file", str(text),
                           "--window", "64", "--max-tokens", "256", "--sparsity", "0,0.5", "--json"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["transform"] == "exact" and len(report["results"]) == 2


def test_broken_checkpoint_configs_are_one_line(ckpt, held_out_text):
    args = ("--text-file", held_out_text, "--window", 32, "--max-tokens", 64, "--device", "cpu")
    edit_config(ckpt, lambda c: c["winaconv"]["levels"].update(abc=c["winaconv"]["levels"]["0.5"]))
    assert_one_line_error(run_cli("eval", ckpt, *args), "level key 'abc' is not a number")
    edit_config(ckpt, lambda c: c["winaconv"]["levels"].pop("abc"))
    edit_config(ckpt, lambda c: c.update(hidden_size=128))
    line = assert_one_line_error(run_cli("eval", ckpt, *args), "cannot be loaded")
    assert "but the config expects [" in line and "winaconv inspect" in line


def test_pickle_only_folders_are_refused_by_every_command(checkpoints, tmp_path, held_out_text):
    """convert refused pickles; eval, generate and bench unpickled them."""
    source = tiny_source(checkpoints().parent)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for entry in source.iterdir():
        if entry.suffix != ".safetensors":
            shutil.copy(entry, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(source / "model.safetensors"), pickled / "pytorch_model.bin")
    for args in (("eval", pickled, "--text-file", held_out_text, "--window", 32), ("generate", pickled, "Hello"),
                 ("bench", pickled, "--prompt-tokens", 8, "--new-tokens", 4),
                 ("convert", pickled, "--out", tmp_path / "out", *TINY)):
        assert_one_line_error(run_cli(*args), "only pickle files: pytorch_model.bin", "safetensors only")


def test_a_shard_from_another_conversion_is_refused(checkpoint_copy, held_out_text):
    """Same architecture and tensor names (global and pca of one model), another conversion."""
    from transformers import AutoModelForCausalLM

    folder = checkpoint_copy("global")
    shutil.copyfile(checkpoint_copy("pca", "other") / "model.safetensors", folder / "model.safetensors")
    found = problems(run_cli("inspect", folder))
    assert len(found) == 1 and "model.safetensors belongs to another conversion" in found[0], found
    assert_one_line_error(run_cli(*eval_args(folder, held_out_text)), "belongs to another conversion")
    with pytest.raises(ValueError, match="belongs to another conversion"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_a_checkpoint_saved_again_by_transformers_still_loads(checkpoints, tmp_path):
    """save_pretrained writes no conversion id into the files: loading accepts files without one (inspect
    reports them), only another conversion's id is refused."""
    from winaconv.use.loading import installed_class

    folder = checkpoints("global")
    cls = installed_class(json.loads((folder / "config.json").read_text()))
    cls.from_pretrained(folder).save_pretrained(tmp_path / "saved-again")
    again = cls.from_pretrained(tmp_path / "saved-again", sparsity=0.25)
    assert again.sparsity == 0.25


def test_a_repeated_conversion_gets_the_same_id(checkpoints, tmp_path):
    from winaconv.convert import ConvertOptions, convert
    from winaconv_runtime.checkpoint_format import safetensors_metadata

    from budgets import TINY_OPTIONS
    from models import CALIB_TEXT, tiny_source

    first = checkpoints("none")
    calib = first.parent / "calib.txt"  # the same file: its path is one of the options
    assert calib.read_text() == CALIB_TEXT
    again = tmp_path / "again"
    convert(ConvertOptions(model=str(tiny_source(first.parent)), out=again, method="wina", transform="none",
                           calib_file=str(calib), device="cpu", **TINY_OPTIONS), say=lambda m: None)
    ids = {json.loads((folder / "config.json").read_text())["winaconv"]["conversion_id"] for folder in (first, again)}
    ids |= {safetensors_metadata(folder / "model.safetensors")["winaconv_conversion_id"] for folder in (first, again)}
    assert len(ids) == 1 and len(next(iter(ids))) == 16


def test_a_threshold_above_every_calibration_score_is_refused(checkpoint_copy, held_out_text):
    from transformers import AutoModelForCausalLM

    folder = checkpoint_copy()
    edit_config(folder, lambda c: c["winaconv"]["levels"]["0.5"]["thresholds"][1].__setitem__(4, 1e30))
    found = problems(run_cli("inspect", folder))
    assert len(found) == 1 and "level 0.5 layer 1 gate: threshold 1e+30 is above the largest score" in found[0], found
    assert_one_line_error(run_cli(*eval_args(folder, held_out_text)), "level 0.5 layer 1 gate: threshold 1e+30")
    with pytest.raises(ValueError, match="threshold 1e"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_a_lower_level_with_a_higher_threshold_is_reported(checkpoint_copy):
    """Thresholds grow with sparsity on one score distribution: a level that drops less with a higher threshold
    cannot come from calibration (found by inspect also where score_max is not recorded)."""
    folder = checkpoint_copy()
    config = json.loads((folder / "config.json").read_text())
    levels = config["winaconv"]["levels"]
    layer, index = next((layer, i) for layer, row in enumerate(levels["0.5"]["sparsities"]) for i, s in enumerate(row)
                        if s > levels["0.25"]["sparsities"][layer][i])
    levels["0.25"]["thresholds"][layer][index] = levels["0.5"]["thresholds"][layer][index] * 2
    del config["winaconv"]["score_max"]
    (folder / "config.json").write_text(json.dumps(config))
    found = problems(run_cli("inspect", folder))
    assert len(found) == 2 and found[0] == "problem: config.json: winaconv section lacks 'score_max'", found
    assert found[1].startswith(f"problem: config.json: layer {layer} ") and "level 0.25's threshold" in found[1]
