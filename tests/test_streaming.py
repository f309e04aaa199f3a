"""Streamed conversion: layer-by-layer reading gives the whole-model path's checkpoint, resumes after a kill,
refuses a resume with other settings, and stays inside its memory bound."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from winaconv.convert import ConvertOptions, convert
from winaconv.convert.write import ShardedWriter, save_sharded
from winaconv.convert.transform import available_transforms
from winaconv_runtime.architectures import family_for_model_type
from winaconv_runtime.checkpoint_format import safetensors_metadata

from random_models import ALL_FAMILIES, random_model
from support import CALIB_TEXT, TINY_OPTIONS, assert_one_line_error, run_cli

REPO = Path(__file__).resolve().parents[1]


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(config, every tensor of every shard)."""
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return json.loads((folder / "config.json").read_text()), tensors


def assert_same_checkpoint(a: Path, b: Path) -> None:
    config_a, tensors_a = load_checkpoint(a)
    config_b, tensors_b = load_checkpoint(b)
    assert config_a == config_b
    assert sorted(tensors_a) == sorted(tensors_b)
    for name, tensor in tensors_a.items():  # bitwise: the arithmetic is the same, only the reading differs
        assert tensor.dtype == tensors_b[name].dtype and torch.equal(tensor, tensors_b[name]), name
    assert (a / "model.safetensors.index.json").is_file() == (b / "model.safetensors.index.json").is_file()


def test_shard_writer_writes_what_safetensors_writes(tmp_path):
    tensors = {"b.weight": torch.randn(3, 5), "a.10.w": torch.randn(2).bfloat16(), "a.2.w": torch.randn(4, 4).half(),
               "z": torch.arange(3), "c": torch.randn(7).double(), "m": torch.ones(2, dtype=torch.bool),
               "u": torch.arange(5, dtype=torch.uint8), "i": torch.arange(5, dtype=torch.int32)}
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    save_sharded(tensors, tmp_path, 10**9, {"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_shard_writer_fills_planned_shards_in_any_order_and_resumes(tmp_path):
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = {f"layer.{i}.w": torch.randn(40 + i, 8) for i in range(6)}
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    writer = ShardedWriter(tmp_path, specs, 3000, {"format": "pt"})
    for name in ["layer.5.w", "layer.0.w", "layer.3.w"]:
        writer.put(name, tensors[name])
    writer.sync()
    with pytest.raises(ValueError, match="planned"):
        writer.put("layer.1.w", torch.zeros(3, 3))
    del writer  # a killed run: its files stay as they are
    resumed = ShardedWriter(tmp_path, specs, 3000, {"format": "pt"}, resume=True)
    resumed.mark_written(["layer.5.w", "layer.0.w", "layer.3.w"])
    for name in ["layer.1.w", "layer.2.w", "layer.4.w"]:
        resumed.put(name, tensors[name])
    resumed.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == split_torch_state_dict_into_shards(tensors, max_shard_size=3000).tensor_to_filename
    read = {}
    for shard in set(index["weight_map"].values()):
        read.update(load_file(tmp_path / shard))
    assert all(torch.equal(read[n], t) for n, t in tensors.items()) and len(read) == len(tensors)


def test_shard_writer_refuses_to_close_with_tensors_missing(tmp_path):
    writer = ShardedWriter(tmp_path, {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}, 10**9, {})
    writer.put("a", torch.zeros(2))
    with pytest.raises(ValueError, match="never written"):
        writer.close()


def _convert(source, out, **options):
    calib = Path(out).parent / "calib.txt"
    calib.write_text(CALIB_TEXT)
    values = dict(TINY_OPTIONS, method="wina", calib_file=str(calib), device="cpu", max_shard_size="200KB")
    values.update(options)
    return convert(ConvertOptions(model=str(source), out=out, **values), say=lambda m: None)


CASES = [(family, kind) for family in ALL_FAMILIES
         for kind in available_transforms(family_for_model_type(random_model(family).config.model_type))]


@pytest.mark.parametrize("family,kind", CASES)
def test_streamed_conversion_equals_the_whole_model_one(tiny_folder, tmp_path, family, kind):
    source = tiny_folder(family)
    _convert(source, tmp_path / "streamed", transform=kind)
    _convert(source, tmp_path / "whole", transform=kind, in_memory=True)
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "whole")
    assert len(list((tmp_path / "streamed").glob("model-*-of-*.safetensors"))) > 1  # sharded, with its index


def test_streamed_divergence_allocation_and_sparse_upstream_equal_the_whole_model_ones(tiny_folder, tmp_path):
    """The divergence allocation replays the converted layers, read back from the shards being written."""
    options = dict(transform="pca", layer_allocation="divergence", upstream="sparse")
    _convert(tiny_folder("qwen2"), tmp_path / "streamed", **options)
    _convert(tiny_folder("qwen2"), tmp_path / "whole", in_memory=True, **options)
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "whole")


# The real model at a budget that runs every stage quickly (one level, few greedy steps); each transform's
# arithmetic is covered on random models of every family above, so the real model runs the default (pca) and
# the one with the most per-layer state (exact), and the GGUF reader one transform
SMOLLM2_BUDGET = dict(calib_tokens=256, seq_len=64, greedy_tokens=64, greedy_step=0.1, sparsity_levels=(0.25,),
                      default_sparsity=0.25)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pca", "exact"])
def test_streamed_smollm2_folder_equals_the_whole_model_one(smollm2_folder, tmp_path, kind):
    budget = dict(SMOLLM2_BUDGET, max_shard_size="100MB")
    _convert(smollm2_folder, tmp_path / "streamed", transform=kind, **budget)
    _convert(smollm2_folder, tmp_path / "whole", transform=kind, in_memory=True, **budget)
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "whole")


@pytest.mark.slow
def test_streamed_smollm2_gguf_equals_the_whole_model_one(smollm2_gguf_path, tmp_path):
    """GGUF tensors are dequantized one at a time, and q/k reordered by transformers' own processor."""
    _convert(smollm2_gguf_path, tmp_path / "streamed", transform="pca", **SMOLLM2_BUDGET)
    _convert(smollm2_gguf_path, tmp_path / "whole", transform="pca", in_memory=True, **SMOLLM2_BUDGET)
    assert_same_checkpoint(tmp_path / "streamed", tmp_path / "whole")


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


MEMORY_SCRIPT = """
import json, sys
from winaconv.convert import ConvertOptions, convert
report = convert(ConvertOptions(model=sys.argv[1], out=sys.argv[2], transform="pca", calib_file=sys.argv[3],
                                calib_tokens=512, seq_len=64, greedy_tokens=64, greedy_step=0.1,
                                sparsity_levels=(0.1,), device="cpu", in_memory=sys.argv[4] == "1"),
                 say=lambda m: None)
print(json.dumps({"grew": report.peak_host_bytes - report.start_host_bytes, "bound": report.host_bound_bytes}))
"""
# What the formula leaves out: the allocator's small-block caches and thread pools, on top of the process
# overhead measured on a one-layer model
SLACK = 64 << 20


def _random_llama(root: Path, name: str, hidden: int, intermediate: int, layers: int) -> Path:
    """A random bf16 Llama folder with the tiny BPE tokenizer (300 tokens: the decoder layers are the model)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from support import tiny_source

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)
    folder = root / name
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for tokenizer_file in tiny_source(root).glob("*token*"):
        shutil.copy(tokenizer_file, folder)
    return folder


def _grew(source: Path, out: Path, in_memory: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(source), str(out),
                           str(source.parent / "calib.txt"), "1" if in_memory else "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_streamed_conversion_stays_inside_its_memory_bound(tmp_path):
    """Peak resident memory (VmHWM, which counts the pages of memory-mapped files the process touched)
    minus the peak before converting, of a 24-layer model of 400 MB in float32: the streamed conversion stays
    under the formula (convert.peak_host_bound) plus the overhead of converting a one-layer model; loading the
    whole model, measured the same way, does not."""
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    deep = _random_llama(tmp_path, "deep", 512, 2048, 24)
    shallow = _random_llama(tmp_path, "shallow", 64, 64, 1)
    float32_bytes = sum(load_file(deep / "model.safetensors")[n].numel() for n in
                        load_file(deep / "model.safetensors")) * 4
    overhead = _grew(shallow, tmp_path / "shallow-out", False)["grew"]
    streamed = _grew(deep, tmp_path / "streamed", False)
    bound = streamed["bound"] + overhead + SLACK
    assert streamed["grew"] <= bound < float32_bytes, (streamed, overhead, float32_bytes)
    whole = _grew(deep, tmp_path / "whole", True)
    assert whole["grew"] > float32_bytes, (whole, streamed, overhead, float32_bytes)
