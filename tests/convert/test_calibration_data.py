"""Calibration text: what is read, refused and said (winaconv/convert/calibration_data.py)."""

import json
import re

import pytest

from winaconv.errors import WinaconvError

from budgets import TINY
from models import CALIB_TEXT, tiny_source
from support import assert_one_line_error, run_cli


def test_calibration_text_that_is_not_text_is_refused(tmp_path):
    from winaconv.convert.calibration_data import read_text_file

    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(WinaconvError, match="not UTF-8 text"):
        read_text_file(binary)
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text('{"id": 1}\n{"id": 2}\n')
    with pytest.raises(WinaconvError, match="'text' field"):
        read_text_file(no_text)
    fine = tmp_path / "ok.txt"
    fine.write_text("Plain prose, with a tab\tand a few accents: café, naïve.\n")
    assert read_text_file(fine) == [fine.read_text()]


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
