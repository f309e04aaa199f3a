"""What a conversion checks before anything slow, and the levels it settles (winaconv/convert/checks.py)."""

import json

from budgets import TINY
from models import CALIB_TEXT, CONTEXT, tiny_source
from support import assert_one_line_error, fake_checkpoint, run_cli

run = run_cli


def test_converting_a_checkpoint_again_is_refused(tmp_path):
    old = fake_checkpoint(tmp_path / "old")
    assert_one_line_error(run("convert", old, "--out", tmp_path / "new", *TINY), "already a winaconv checkpoint")


def test_default_sparsity_follows_the_stored_levels(tmp_path):
    from winaconv.convert import ConvertOptions
    from winaconv.convert.checks import validate

    options = ConvertOptions(model="m", out=tmp_path / "o", sparsity_levels=(0.25, 0.4))
    assert validate(options) == ([0.25, 0.4], 0.4) and options.default_sparsity is None
    options = ConvertOptions(model="m", out=tmp_path / "o", sparsity_levels=(0.25, 0.5, 0.65))
    assert validate(options).default_sparsity == 0.5


def test_chosen_default_sparsity_is_said(tmp_path, tiny_folder, calib_file):
    result = run("convert", tiny_folder("llama"), "--out", tmp_path / "ckpt", "--calib-file", calib_file,
                 "--device", "cpu", *TINY[:-1], "0.25,0.4")
    assert result.exit_code == 0, result.output
    assert "default sparsity: 0.4" in result.output
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["winaconv"]["default_sparsity"] == 0.4


def test_convert_seq_len_past_the_context_is_refused(checkpoints, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT * 4)
    out = tmp_path / "out"
    result = run_cli("convert", tiny_source(checkpoints().parent), "--out", out, "--calib-file", calib,
                     "--calib-tokens", 1024, "--seq-len", 2 * CONTEXT, "--device", "cpu")
    assert_one_line_error(result, f"--seq-len {2 * CONTEXT} is longer than the model's context of {CONTEXT}",
                          after_progress=True)
    assert not out.exists()
