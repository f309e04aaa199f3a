"""Host memory and wall time of a conversion, streamed (layer by layer) against --in-memory, on this CPU.

  python benchmarks/convert_memory.py --work /tmp/convert-memory --out results/convert_memory_cpu.json
  python benchmarks/convert_memory.py --formula    # the bound for the Llama-3-8B and -70B configs, no run
  python benchmarks/convert_memory.py --smoke --work /tmp/cm --out /tmp/cm.json   # SMOKE_LLAMA, seconds (CI)

The model is the random ~1B Llama-architecture model of cpu_decode.py (common.RANDOM_1B: hidden 2048, 16 layers, intermediate
8192, 49152-token vocabulary, untied) in bf16; each conversion runs in its own process (`winaconv convert`, pca,
a small calibration budget: the memory question does not need the default one). Recorded per run: wall
time, the peak resident memory of the converting process (VmHWM, as its summary prints it), how much it grew
during the conversion, and for the streamed run the bound the formula gives (convert.peak_host_bound).
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LLAMA3_8B, LLAMA3_70B, RANDOM_1B, SMOKE_LLAMA  # noqa: E402

ASSETS = Path(__file__).resolve().parent / "assets"  # SmolLM2's tokenizer (49152 tokens)
BUDGET = ["--calib-tokens", "1024", "--seq-len", "256", "--greedy-tokens", "256", "--greedy-step", "0.05",
          "--sparsity-levels", "0.5"]
SMOKE_BUDGET = ["--calib-tokens", "256", "--seq-len", "64", "--greedy-tokens", "64", "--greedy-step", "0.2",
                "--sparsity-levels", "0.5"]


def make(folder: Path, shape: dict) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.8, 1.2)  # non-trivial norms: folding them is real work
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(ASSETS).save_pretrained(folder)


def run(source: Path, out: Path, calib: Path, in_memory: bool, budget: list[str]) -> dict:
    command = [sys.executable, "-m", "winaconv.cli", "convert", str(source), "--out", str(out), "--overwrite",
               "--device", "cpu", "--transform", "pca", "--calib-file", str(calib), *budget]
    if in_memory:
        command.append("--in-memory")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={"COLUMNS": "300", **dict(__import__("os").environ)})
    seconds = time.perf_counter() - started
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    text = " ".join(done.stderr.split())
    peak = float(re.search(r"peak host memory ([\d.]+) GiB", text).group(1))
    grew = re.search(r"grew by ([\d.]+) GiB .* stay under ([\d.]+) GiB", text)
    return {"mode": "in-memory" if in_memory else "streamed", "command": " ".join(command), "wall_seconds": round(seconds, 1),
            "peak_host_gib": peak, "grew_gib": float(grew.group(1)) if grew else None,
            "bound_gib": float(grew.group(2)) if grew else None,
            "summary": [line for line in done.stderr.splitlines() if line.startswith(("wrote", "host memory"))]}


def formula(values: dict, tokens: int = 16384, work_dtype=torch.bfloat16) -> dict:
    """convert.peak_host_bound for a Llama config (a meta-device skeleton: nothing is allocated), in GiB,
    with its terms; tokens and dtype as a default GPU conversion has them."""
    from transformers import LlamaConfig

    from winaconv.convert.calibrate import CalibrationSettings
    from winaconv.convert.memory import peak_host_bound
    from winaconv.convert.layers import end_names
    from winaconv.convert.runtime_model import skeleton
    from winaconv.convert.runtime_model import winaconv_section

    model = skeleton(LlamaConfig(**values), winaconv_section("wina", "pca", ()))
    settings = CalibrationSettings(norm_scored=(), max_sparsity=0.65, greedy_sequences=4)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    ends = sum(model.state_dict()[n].numel() for n in end_names(model))
    return {"bound_gib": round(peak_host_bound(model, tokens, work_dtype, settings) / 2**30, 2),
            "ends_float32_gib": round(ends * 4 / 2**30, 2), "three_layers_float64_gib": round(3 * layer * 8 / 2**30, 2),
            "model_float32_gib": round((ends + layer * values["num_hidden_layers"]) * 4 / 2**30, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/convert-memory"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "convert_memory_cpu.json")
    parser.add_argument("--formula", action="store_true", help="print the bound for Llama-3-8B and -70B and stop")
    parser.add_argument("--smoke", action="store_true", help="SMOKE_LLAMA and a tiny budget: checks the script runs")
    args = parser.parse_args()
    if args.formula or args.smoke:
        for name, values in (("Llama-3-8B", LLAMA3_8B), ("Llama-3-70B", LLAMA3_70B)):
            print(name, json.dumps(formula(values)))
        if args.formula:
            return
    shape, budget = (SMOKE_LLAMA, SMOKE_BUDGET) if args.smoke else (RANDOM_1B, BUDGET)
    args.work.mkdir(parents=True, exist_ok=True)
    source = args.work / ("smoke" if args.smoke else "random-1b")
    make(source, shape)
    calib = args.work / "calib.txt"
    from winaconv.convert.calibration_data import builtin_texts

    calib.write_text("\n\n".join(builtin_texts()))
    float32_gib = sum(p.numel() for p in __import__("transformers").LlamaForCausalLM(
        __import__("transformers").LlamaConfig(**shape)).parameters()) * 4 / 2**30
    records = {"model": "random Llama, " + ", ".join(f"{k}={v}" for k, v in shape.items()),
               "float32_gib": round(float32_gib, 2), "threads": torch.get_num_threads(), "runs": []}
    for in_memory in (False, True):
        records["runs"].append(run(source, args.work / ("whole" if in_memory else "streamed"), calib, in_memory, budget))
        print(json.dumps(records["runs"][-1]), flush=True)
    args.out.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
