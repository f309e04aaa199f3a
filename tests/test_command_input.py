"""Issue 25: what a new user met. Bad input to `eval`, `generate`, `bench` and `convert` stops with one line
(never a traceback), before anything slow where it can; nothing is written through a symbolic link or into a
folder that is not a winaconv checkpoint; and the messages say what really happened. The models are the tiny
random Llama (128 positions) and its converted checkpoints (support.tiny_checkpoint)."""

import json
import re
import shutil

import pytest
import torch

from support import CALIB_TEXT, TINY, assert_one_line_error, edit_config, run_cli, tiny_source

CONTEXT = 128  # the tiny models' max_position_embeddings


@pytest.fixture
def ckpt(checkpoint_copy):
    return checkpoint_copy("global")


# ---------------------------------------------------------------- item 3: context length


def test_eval_window_past_the_context_is_refused(ckpt, checkpoints, held_out_text):
    for model in (ckpt, tiny_source(checkpoints().parent)):  # a checkpoint, and a plain model evaluated dense
        line = assert_one_line_error(run_cli("eval", model, "--text-file", held_out_text, "--window", 2 * CONTEXT))
        assert f"--window {2 * CONTEXT} is longer than the model's context of {CONTEXT} positions" in line


def test_convert_seq_len_past_the_context_is_refused(checkpoints, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT * 4)
    out = tmp_path / "out"
    result = run_cli("convert", tiny_source(checkpoints().parent), "--out", out, "--calib-file", calib,
                     "--calib-tokens", 1024, "--seq-len", 2 * CONTEXT, "--device", "cpu")
    assert_one_line_error(result, f"--seq-len {2 * CONTEXT} is longer than the model's context of {CONTEXT}",
                          after_progress=True)
    assert not out.exists()


# ---------------------------------------------------------------- item 5: one line, never a traceback


def test_generate_bad_input_is_one_line(ckpt):
    cases = [(("",), "the prompt is empty"),
             (("Hello", "--sample", "--temperature", "0"), "--temperature must be above 0; got 0"),
             (("Hello", "--sample", "--temperature", "-1"), "--temperature must be above 0; got -1"),
             (("Hello", "--sample", "--top-p", "0"), "--top-p must lie in (0, 1]; got 0"),
             (("Hello", "--sample", "--top-p", "1.5"), "--top-p must lie in (0, 1]; got 1.5")]
    for args, words in cases:
        assert_one_line_error(run_cli("generate", ckpt, *args), words)
    long_prompt = "word " * (2 * CONTEXT)
    line = assert_one_line_error(run_cli("generate", ckpt, long_prompt, "--device", "cpu"), after_progress=True)
    assert re.search(rf"the prompt has \d+ tokens, more than the model's context of {CONTEXT}", line), line
    line = assert_one_line_error(run_cli("generate", ckpt, "Hello", "--max-new-tokens", CONTEXT, "--device", "cpu"),
                                 after_progress=True)
    assert f"new tokens exceed the model's context of {CONTEXT}" in line


def test_bench_prompt_past_the_context_is_one_line(ckpt):
    line = assert_one_line_error(run_cli("bench", ckpt, "--prompt-tokens", 2 * CONTEXT))
    assert f"--prompt-tokens has {2 * CONTEXT} tokens, more than the model's context of {CONTEXT}" in line
    line = assert_one_line_error(run_cli("bench", ckpt, "--prompt-tokens", CONTEXT - 4, "--new-tokens", 8))
    assert f"exceed the model's context of {CONTEXT}" in line


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


# ---------------------------------------------------------------- item 6: writes only where asked


def test_bench_save_writes_only_into_a_checkpoint_and_not_through_links(ckpt, checkpoints, tmp_path):
    """Refused before the timing starts."""
    short = ("--save", "--prompt-tokens", 8, "--new-tokens", 4)
    results = ckpt / "winaconv_results.json"
    results.write_text("{not json")
    assert_one_line_error(run_cli("bench", ckpt, *short), "cannot read results file", "winaconv_results.json")
    outside = tmp_path / "outside.json"
    results.unlink()
    results.symlink_to(outside)
    assert_one_line_error(run_cli("bench", ckpt, *short), "is a symbolic link", "not writing through it")
    assert not outside.exists() and results.is_symlink()
    source = tiny_source(checkpoints().parent)
    assert_one_line_error(run_cli("bench", source, *short), "--save writes winaconv_results.json into a local "
                          "winaconv checkpoint folder")
    assert not (source / "winaconv_results.json").exists()


def test_convert_out_that_is_a_symlink_is_refused(ckpt, checkpoints, tmp_path):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    result = run_cli("convert", tiny_source(checkpoints().parent), "--out", link, "--overwrite", "--calib-file", calib,
                     *TINY)
    assert_one_line_error(result, "is a symbolic link", "give the folder itself")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # no staging marker inside the target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "ckpt", "link"] and link.is_symlink()


# ---------------------------------------------------------------- item 7: messages that say what happened


def test_gguf_files_that_are_not_gguf_or_cut_short_say_so(tmp_path):
    from winaconv.testing import smollm2_gguf

    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("this is a text file\n")
    assert_one_line_error(run_cli("convert", not_gguf, "--out", tmp_path / "out"), "is not a GGUF file")
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf(), "rb") as whole:
        cut.write_bytes(whole.read(1 << 20))  # a download cut short, inside the vocabulary
    line = assert_one_line_error(run_cli("convert", cut, "--out", tmp_path / "out"), "cannot read the GGUF file cut.gguf")
    assert "unsupported architecture" not in line and "is it whole?" in line


def test_calibration_sources_and_budget_are_said(checkpoints, tmp_path):
    source = tiny_source(checkpoints().parent)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    out = tmp_path / "out"
    both = run_cli("convert", source, "--out", out, "--calib-file", calib, "--calib-dataset", "tatsu-lab/alpaca", *TINY)
    assert_one_line_error(both, "--calib-file and --calib-dataset both given")
    options = dict(zip(TINY[::2], TINY[1::2]), **{"--calib-tokens": "100000"})
    result = run_cli("convert", source, "--out", out, "--calib-file", calib, "--device", "cpu",
                     *[item for pair in options.items() for item in pair])
    assert result.exit_code == 0, result.output
    said = re.search(r"calibrating on (\d+) tokens, not the 100000 --calib-tokens asks for", result.output)
    assert said, result.output
    assert json.loads((out / "config.json").read_text())["winaconv"]["calibration"]["tokens"] == int(said.group(1))


def test_host_memory_past_the_bound_is_warned(capsys, tmp_path):
    from winaconv.convert.memory import PROCESS_ALLOWANCE
    from winaconv.convert.pipeline import ConvertReport
    from winaconv.render import print_summary

    def summary(grew: int) -> str:
        report = ConvertReport(out=tmp_path, levels={0.5: [dict.fromkeys(("q", "k", "v", "o", "gate", "up", "down"), 0.5)]},
                               layer_seconds=[1.0], peak_host_bytes=(1 << 30) + grew, start_host_bytes=1 << 30,
                               host_bound_bytes=1 << 28)
        print_summary(report, 0.5)
        return capsys.readouterr().err

    assert "warning" not in summary((1 << 28) + PROCESS_ALLOWANCE)  # within the bound and the process's allowance
    warned = summary((1 << 29) + PROCESS_ALLOWANCE)
    assert "warning: that is 0.25 GiB more than the bound" in " ".join(warned.split())


def test_generate_times_the_decode_apart_from_the_start_up(ckpt):
    result = run_cli("generate", ckpt, "The quick brown fox", "--max-new-tokens", 40, "--sparsity", "0.5",
                     "--device", "cpu")
    assert result.exit_code == 0, result.output
    line = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"(\d+) tokens, ([\d.]+) ms/token decode, ([\d.]+) tokens/s \(the last (\d+); the first "
                         r"(\d+) took (\d+) ms with the prompt and start-up\); sparsity 0.5, cpu", line)
    assert match, line
    total, per_token, rate, last, first, first_ms = (float(g) for g in match.groups())
    assert first + last == total and last >= 1 and first_ms > 0
    assert abs(rate - 1000 / per_token) <= 0.1 * rate
    short = run_cli("generate", ckpt, "The quick brown fox", "--max-new-tokens", 4, "--device", "cpu")
    assert short.exit_code == 0, short.output
    assert "with the prompt and start-up included (too few tokens to time the decode alone" in short.stderr
