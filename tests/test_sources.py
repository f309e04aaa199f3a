"""Where a model comes from: a source folder's problems are one-line errors (winaconv/sources.py)."""

import json

from budgets import TINY
from support import assert_one_line_error, run_cli

run = run_cli


def test_source_folder_problems_are_one_line(tmp_path):
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "out"
    result = run("convert", bad_json, "--out", out, *TINY)
    assert_one_line_error(result, "not valid JSON")
    assert "HF_HUB_OFFLINE" not in result.output
    assert_one_line_error(run("convert", no_weights, "--out", out, *TINY), "no safetensors weights")
    assert not out.exists()


def test_source_without_tokenizer_and_corrupt_weights_are_one_line(tmp_path, tiny_folder):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny_folder("llama") / name).read_bytes())
    assert_one_line_error(run("convert", no_tokenizer, "--out", tmp_path / "out", *TINY), "tokenizer", after_progress=True)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for entry in tiny_folder("llama").iterdir():
        (corrupt / entry.name).write_bytes(entry.read_bytes())
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut in half
    text = tmp_path / "held_out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    assert_one_line_error(run("eval", corrupt, "--text-file", text, "--window", "32", "--max-tokens", "64"), "cannot load",
                          after_progress=True)
    assert_one_line_error(run("convert", corrupt, "--out", tmp_path / "out", *TINY), "cannot load the weights",
                          after_progress=True)
    assert not (tmp_path / "out").exists()
