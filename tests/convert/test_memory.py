"""A streamed conversion stays inside its host-memory bound, and says so when it grows past it
(winaconv/convert/memory.py)."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from models import CALIB_TEXT

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

    from models import tiny_source

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
