"""`winaconv eval`: perplexity on held-out text through the runtime's sparse path, and its bad input.

The held-out text is the Lee news corpus shipped in gensim's wheel (pip install --no-deps gensim);
the fixtures' checkpoints are calibrated on Python's documentation, so calibration and evaluation
texts differ.
"""

import json
import math

import pytest
from click.testing import CliRunner

from winaconv.cli import main
from winaconv.evaluate import EvalOptions, evaluate, windows

# Two windows of 512 held-out tokens: small enough for CI's two cores, large enough to rank methods.
FAST_EVAL = dict(window=512, stride=512, max_tokens=1024, device="cpu", dtype="float32")


def run(*args):
    return CliRunner().invoke(main, ["eval", *(str(a) for a in args)], catch_exceptions=False)


def one_line_error(result) -> str:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("num_tokens,window,stride", [(10, 4, 4), (10, 4, 2), (9, 3, 1), (8, 8, 8), (11, 5, 3)])
def test_windows_score_each_token_at_most_once_with_context(num_tokens, window, stride):
    spans = windows(num_tokens, window, stride)
    scored = [t for begin, end, first in spans for t in range(first, end)]
    assert len(scored) == len(set(scored)) and spans[-1][1] == num_tokens
    for begin, end, first in spans:
        assert end - begin <= window and begin < first <= end
    if stride < window:  # overlapping windows leave no token unscored but the very first
        assert sorted(scored) == list(range(1, num_tokens))


@pytest.mark.slow
def test_wina_beats_teal_at_half_sparsity_and_level_zero_is_the_base_model(smollm2_folder, converted_smollm2):
    wina = evaluate(EvalOptions(model=str(converted_smollm2("wina", "global")), levels=(0.0, 0.5), **FAST_EVAL),
                    say=lambda m: None)
    teal = evaluate(EvalOptions(model=str(converted_smollm2("teal", "none")), levels=(0.0, 0.5), **FAST_EVAL),
                    say=lambda m: None)
    base = evaluate(EvalOptions(model=str(smollm2_folder), **FAST_EVAL), say=lambda m: None)

    ppl = {name: {r.sparsity: r.perplexity for r in report.results} for name, report in
           (("wina", wina), ("teal", teal), ("base", base))}
    assert list(ppl["base"]) == [0.0] and base.method == "dense"
    assert wina.method == "wina" and wina.transform == "global" and teal.method == "teal"
    assert base.results[0].tokens == wina.results[0].tokens == teal.results[0].tokens == 1022
    # sparsity 0 is the dense model: the same perplexity as the untouched base model, up to float rounding
    # (the global rotation is folded into the weights in float64, then stored in float32)
    assert ppl["teal"][0.0] == pytest.approx(ppl["base"][0.0], rel=1e-4)
    assert ppl["wina"][0.0] == pytest.approx(ppl["base"][0.0], rel=1e-3)
    # the sparse path really runs: 50% costs perplexity, and WINA costs less of it than TEAL
    assert ppl["wina"][0.5] > ppl["wina"][0.0] * 1.01
    assert ppl["wina"][0.5] < ppl["teal"][0.5], ppl


@pytest.mark.slow
def test_eval_json_output(converted_smollm2, tmp_path):
    text = tmp_path / "held-out.txt"
    text.write_text("The river rose through the night and by morning the low fields were under water. " * 40)
    result = run(converted_smollm2("wina", "global"), "--text-file", text, "--sparsity", "0,0.5",
                 "--window", 128, "--stride", 64, "--max-tokens", 256, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["window"], report["stride"], report["text_tokens"]) == (128, 64, 256)
    assert (report["method"], report["transform"], report["scoring"]) == ("wina", "global", "paper")
    assert [r["sparsity"] for r in report["results"]] == [0.0, 0.5]
    for r in report["results"]:
        assert r["tokens"] == 255 and math.isclose(r["perplexity"], math.exp(r["nll"]))


@pytest.mark.slow
def test_eval_bad_input_is_one_line(smollm2_folder, converted_smollm2, tmp_path):
    checkpoint = converted_smollm2("wina", "global")
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")

    assert "text file not found" in one_line_error(run(checkpoint, "--text-file", tmp_path / "missing.txt"))
    assert "fewer than one window of 512" in one_line_error(run(checkpoint, "--text-file", short))
    line = one_line_error(run(checkpoint, "--text-file", short, "--sparsity", "0.3"))
    assert "sparsity 0.3 is not stored" in line and "0, 0.25, 0.5" in line
    assert "plain model" in one_line_error(run(smollm2_folder, "--text-file", short, "--sparsity", "0.5"))
    assert "--stride" in one_line_error(run(checkpoint, "--text-file", short, "--window", 8, "--stride", 9))
    assert "--max-tokens" in one_line_error(run(checkpoint, "--max-tokens", 100))
    assert "model not found" in one_line_error(run(tmp_path / "no-such-model", "--text-file", short))


@pytest.mark.slow
def test_tasks_unavailable_is_said_in_one_line(converted_smollm2, tmp_path):
    text = tmp_path / "held-out.txt"
    text.write_text("A short story about a cat that sat by the window and watched the rain. " * 10)
    result = run(converted_smollm2("teal", "none"), "--text-file", text, "--sparsity", "0", "--window", 64,
                 "--max-tokens", 64, "--tasks", "piqa,arc_easy", "--json")
    assert result.exit_code == 0, result.output
    tasks = json.loads(result.stdout)["tasks"]
    # here (CI) lm_eval is not installed or HF_HUB_OFFLINE is set by conftest: the tasks cannot run
    assert "cannot be run" in tasks["error"] and "\n" not in tasks["error"]
    assert "piqa,arc_easy cannot be run" in result.stderr
