"""Reading a source's weights: files that are not what they claim are refused in one line
(winaconv/convert/weights.py)."""

from support import assert_one_line_error, run_cli


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
