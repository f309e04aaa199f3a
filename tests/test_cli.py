"""The command line as a whole: a conversion end to end, one-line errors and no output for bad input, --help
(winaconv/cli.py)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from winaconv_runtime.checkpoint_format import FORMAT_VERSION

from budgets import TINY
from support import assert_one_line_error, run_cli

run = run_cli


def test_help_does_not_import_torch():
    """Case 10: every command, --help included, took 5-7 s because torch, transformers and every model
    family were imported up front."""
    probe = "import sys, winaconv.cli; sys.exit(sorted({'torch', 'transformers'} & set(sys.modules)) != [])"
    assert subprocess.run([sys.executable, "-c", probe], timeout=120).returncode == 0
    for command in ("convert", "eval", "inspect", "push", "generate", "bench"):
        done = subprocess.run([sys.executable, "-m", "winaconv.cli", command, "--help"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "Usage:" in done.stdout, (command, done.stderr[-500:])


def convert(model, out, calib_file, *extra):
    result = run("convert", model, "--out", out, "--calib-file", calib_file, "--device", "cpu", *TINY, *extra)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
@pytest.mark.parametrize("transform", ["exact", "global", "pca", "none"])
def test_convert_loads_dense_with_original_logits(tiny_folder, calib_file, tmp_path, family, transform):
    source = tiny_folder(family)
    out = convert(source, tmp_path / "ckpt", calib_file, "--transform", transform)
    config = json.loads((out / "config.json").read_text())
    assert config["winaconv"]["format_version"] == FORMAT_VERSION
    assert config["winaconv"]["transform"] == transform
    assert sorted(config["winaconv"]["levels"]) == ["0.25", "0.5"]
    assert (out / "modeling_winaconv.py").is_file() and (out / "kernels.py").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"

    original = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        expected = original(ids).logits
        sparse, info = AutoModelForCausalLM.from_pretrained(
            out, trust_remote_code=True, sparsity=0, output_loading_info=True
        )
        assert not any(v for k, v in info.items() if k != "error_msgs")
        assert type(sparse).__name__.startswith("WinaExact" if transform == "exact" else "Wina")
        assert torch.allclose(sparse(ids).logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
        if transform == "exact":
            # its weights are not a plain model: without the runtime it must refuse, not load wrong
            with pytest.raises(ValueError):
                AutoModelForCausalLM.from_pretrained(out)
        else:
            plain, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
            assert type(plain) is type(original)
            assert not any(v for k, v in info.items() if k != "error_msgs")
            assert torch.allclose(plain(ids).logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_bad_input_gives_one_line_and_no_output(tiny_folder, calib_file, tmp_path):
    out = tmp_path / "out"
    source = tiny_folder("llama")
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    no_text_field = tmp_path / "records.jsonl"
    no_text_field.write_text('{"id": 1, "score": 0.5}\n{"id": 2, "score": 0.7}\n')
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(gpt2)

    cases = [
        (["convert", tmp_path / "missing-model", "--out", out], ["not found"]),
        (["convert", tmp_path / "missing.gguf", "--out", out], ["not found"]),
        (["convert", gpt2, "--out", out, "--calib-file", calib_file], ["unsupported architecture", "gpt2", "llama"]),
        (["convert", source, "--out", out, "--sparsity-levels", "0.5,1.0"], ["[0, 1)"]),
        (["convert", source, "--out", out, "--sparsity-levels", "-0.1"], ["[0, 1)"]),
        (["convert", source, "--out", out, "--calib-file", empty], ["empty"]),
        (["convert", source, "--out", out, "--calib-file", tmp_path / "nope.txt"], ["not found"]),
        (["convert", source, "--out", out, "--calib-file", binary], ["not UTF-8 text"]),
        (["convert", source, "--out", out, "--calib-file", no_text_field], ["no record", "'text'"]),
        (["convert", source, "--out", out, "--calib-file", calib_file, "--device", "tpu"], ["--device", "tpu"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["convert", source, "--out", out, "--calib-file", calib_file, "--device", "cuda"], ["no CUDA GPU"]))
    for args, words in cases:
        assert_one_line_error(run(*args[:4], *TINY, *args[4:]), *words)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert_one_line_error(run("convert", source, "--out", out, "--calib-file", calib_file, *TINY), "--overwrite")
    assert (out / "keep.txt").read_text() == "user data"

    # --overwrite replaces only a previous winaconv checkpoint, never a folder of other files
    assert_one_line_error(run("convert", source, "--out", out, "--calib-file", calib_file, "--overwrite", *TINY),
                          "not a winaconv checkpoint")
    assert (out / "keep.txt").read_text() == "user data"


def test_help_lists_every_option():
    result = run("convert", "--help")
    assert result.exit_code == 0
    for option in ("--method", "--transform", "--sparsity-levels", "--calib-file", "--calib-dataset",
                   "--calib-tokens", "--seq-len", "--device", "--dtype", "--seed"):
        assert option in result.output
