"""Helpers shared by the CLI tests (not a test module): the tiny conversion budget and the
one-line-error assertion."""

TINY = ["--calib-tokens", "256", "--seq-len", "32", "--greedy-tokens", "64", "--sparsity-levels", "0.25,0.5"]


def assert_one_line_error(result, *words):
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]
