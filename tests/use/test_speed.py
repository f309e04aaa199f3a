"""winaconv generate and bench: bad input is one line, results are saved only into a checkpoint, timings leave out the
start-up (winaconv/use/speed.py)."""

import re

from models import CONTEXT, tiny_source
from support import assert_one_line_error, run_cli


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
