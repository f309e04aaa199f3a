"""An interrupted conversion resumes after its last finished layer, and only for the same command and source
(winaconv/convert/resume.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from winaconv_runtime.checkpoint_format import safetensors_metadata

from models import CALIB_TEXT
from support import assert_one_line_error, assert_same_checkpoint, run_cli


def _slow_source(root: Path) -> Path:
    """An 8-layer random Llama whose conversion takes a few seconds (time to interrupt it)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from winaconv.testing import smollm2_gguf

    folder = root / "eight-layers"
    if not folder.is_dir():
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256)
        LlamaForCausalLM(config).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    (root / "calib.txt").write_text(CALIB_TEXT)
    return folder


def _convert_command(source: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "winaconv.cli", "convert", str(source), "--out", str(out), "--device", "cpu",
            "--transform", "pca", "--calib-file", str(source.parent / "calib.txt"), "--calib-tokens", "1024",
            "--seq-len", "64", "--greedy-tokens", "256", "--greedy-step", "0.02", "--sparsity-levels", "0.25,0.5",
            "--max-shard-size", "1MB", *extra]


def _staging(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def _finished_layers(out: Path) -> int:
    for staging in _staging(out):
        try:
            return len(json.loads((staging / ".resume" / "state.json").read_text())["layers"])
        except (OSError, ValueError):
            pass
    return 0


def _start_and_stop(command, out: Path, after_layers: int, sig) -> tuple[int, str]:
    """(exit status, stderr) of `command` sent `sig` once its journal records `after_layers` finished layers."""
    log = out.with_name(out.name + ".stderr")
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "COLUMNS": "200"})
        deadline = time.monotonic() + 300
        while _finished_layers(out) < after_layers and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(sig)
        process.wait(60)
    return process.returncode, log.read_text()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    source = _slow_source(root)
    out = root / "uninterrupted"
    done = subprocess.run(_convert_command(source, out), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return source, out


def test_a_killed_conversion_resumes_after_its_last_layer(uninterrupted, tmp_path):
    source, reference = uninterrupted
    out = tmp_path / "ckpt"
    status, _ = _start_and_stop(_convert_command(source, out), out, 2, signal.SIGKILL)
    assert status == -signal.SIGKILL
    kept = _finished_layers(out)
    assert 2 <= kept < 8 and not out.exists()
    again = subprocess.run(_convert_command(source, out), capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert again.returncode == 0, again.stderr
    assert f"resuming after layer {kept} of 8" in again.stderr and f"(resumed after layer {kept})" in again.stderr
    assert_same_checkpoint(out, reference)
    assert _staging(out) == [] and not (out / ".resume").exists()
    # the resumed run's shards, written by two processes, carry the one conversion id of the config (issue 25)
    ids = {safetensors_metadata(shard)["winaconv_conversion_id"] for shard in out.glob("*.safetensors")}
    assert ids == {json.loads((out / "config.json").read_text())["winaconv"]["conversion_id"]}


def test_ctrl_c_keeps_the_finished_layers_for_the_same_command(uninterrupted, tmp_path):
    source, reference = uninterrupted
    out = tmp_path / "ckpt"
    status, stderr = _start_and_stop(_convert_command(source, out), out, 1, signal.SIGINT)
    assert status != 0
    assert "run the same command again to resume" in stderr
    assert _finished_layers(out) >= 1
    result = run_cli(*_convert_command(source, out)[3:])
    assert result.exit_code == 0, result.output
    assert_same_checkpoint(out, reference)


def test_a_resume_with_other_settings_is_refused_in_one_line(uninterrupted, tmp_path):
    source, reference = uninterrupted
    out = tmp_path / "ckpt"
    _start_and_stop(_convert_command(source, out), out, 1, signal.SIGKILL)
    leftover = _staging(out)
    assert len(leftover) == 1
    changed = run_cli(*_convert_command(source, out, "--greedy-step", "0.03")[3:])
    line = assert_one_line_error(changed, "interrupted conversion", "--overwrite", after_progress=True)
    assert "(differs in: --greedy-step)" in line  # and in nothing else
    assert _staging(out) == leftover  # nothing removed without --overwrite
    discarded = run_cli(*_convert_command(source, out, "--greedy-step", "0.03", "--overwrite")[3:])
    assert discarded.exit_code == 0, discarded.output
    assert "resuming" not in discarded.output and _staging(out) == []
    assert json.loads((out / "config.json").read_text())["winaconv"]["calibration"]["greedy_step"] == 0.03


def test_a_second_conversion_to_the_same_out_is_refused_while_one_runs(uninterrupted, tmp_path):
    """Issue 25: two conversions racing for one --out both ran; the loser's finished checkpoint stayed in a hidden
    staging folder for good."""
    source, _ = uninterrupted
    out = tmp_path / "ckpt"
    first = subprocess.Popen(_convert_command(source, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not _staging(out) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _staging(out), "the first conversion never started"
        line = assert_one_line_error(run_cli(*_convert_command(source, out)[3:]), f"another conversion to {out} is "
                                     f"running (process {first.pid}")
        assert "choose another --out" in line
    finally:
        first.kill()
        first.wait(60)


def test_a_resume_after_the_source_changed_is_refused(tmp_path):
    """Issue 25: the fingerprint covered the weight files' names, sizes and times, not config.json: a conversion
    killed after a layer, whose source config was then edited, resumed and mixed two models in one checkpoint."""
    source = _slow_source(tmp_path)
    out = tmp_path / "ckpt"
    _start_and_stop(_convert_command(source, out), out, 1, signal.SIGKILL)
    leftover = _staging(out)
    assert len(leftover) == 1 and _finished_layers(out) >= 1
    for name, change, what in (("config.json", {"rms_norm_eps": 1e-3}, "the source's config"),
                               ("generation_config.json", {"max_length": 99}, "the source's generation config")):
        original = (source / name).read_text()
        (source / name).write_text(json.dumps({**json.loads(original), **change}))
        line = assert_one_line_error(run_cli(*_convert_command(source, out)[3:]), "interrupted conversion",
                                     after_progress=True)
        assert f"(differs in: {what})" in line, line
        assert _staging(out) == leftover and not out.exists()
        (source / name).write_text(original)
