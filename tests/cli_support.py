"""Helpers shared by the CLI tests (not a test module): the tiny conversion budget and the
one-line-error assertion."""

TINY = ["--calib-tokens", "256", "--seq-len", "32", "--greedy-tokens", "64", "--sparsity-levels", "0.25,0.5"]


def assert_one_line_error(result, *words, after_progress=False):
    """The command failed with one line starting "Error:" and no traceback; with after_progress, the
    "winaconv: ..." lines a command prints while it works may come first."""
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    if after_progress:
        assert "Traceback" not in result.output, result.output
        lines = [line for line in lines if line.startswith("Error:")] if lines[-1].startswith("Error:") else lines
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]
