"""Every script kept in benchmarks/ runs here on the CPU in seconds (its --smoke mode: tiny shapes, the same code
path as the measurement), so a change elsewhere that breaks a script fails CI instead of the next GPU session.
tp_decode.py's smoke run (two gloo ranks) is in tests/runtime/test_tensor_parallel.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
kernel_bench = pytest.importorskip("kernel_bench")


def run_script(name: str, *args, timeout: int = 600) -> str:
    """`python benchmarks/NAME args`; its stdout, or a failure showing the end of its output."""
    command = [sys.executable, str(BENCHMARKS / name), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout


def test_kernel_table_runs_and_follows_the_runtime_choice(monkeypatch):
    """kernel_bench.py's table code on small shapes (Triton's interpreter, one launch per timing instead of a CUDA
    graph), with the GPU's configs: the runtime's choice is the tile at 50% and the kept-list kind at 90%."""
    outputs = []

    def one_launch(make_call, n_copies, loop=16, replays=9):
        out = make_call(0)
        assert torch.isfinite(out).all()
        outputs.append(out)
        return 1.0

    monkeypatch.setattr(kernel_bench, "DEVICE", "cpu")
    monkeypatch.setattr(kernel_bench, "graph_time", one_launch)
    monkeypatch.setattr(kernel_bench, "SPARSITIES", [0.5, 0.9])
    monkeypatch.setattr(kernel_bench.K, "_interpreting", lambda: False)  # the GPU's configs, interpreted
    monkeypatch.setattr(kernel_bench, "LINES", [])
    results = []
    kernel_bench.run_shape("small", 192, (64, 160), None, results, batches=(1, 2), sweep=False)
    kernel_bench.summary(results, 1.0)
    by_level = {r["sparsity"]: r for r in results if r["T"] == 1}
    assert "kind='tile'" in by_level[0.5]["runtime_config"] and "kind='list'" in by_level[0.9]["runtime_config"]
    assert all(math.isfinite(r["runtime"]) for r in results)
    assert {r["T"] for r in results} == {1, 2} and len(outputs) == len(results) * 2  # cuBLAS + runtime per row


def test_kernel_bench_smoke(tmp_path):
    run_script("kernel_bench.py", "--smoke", "--out", tmp_path / "kernel.txt")
    rows = json.loads((tmp_path / "kernel.json").read_text())["results"]
    assert {(r["T"], r["sparsity"]) for r in rows} >= {(1, 0.0), (1, 0.5), (1, 0.9), (2, 0.5)}
    assert all(r["runtime"] > 0 and r["cublas"] > 0 for r in rows)
    assert "summary: speed-up over cuBLAS" in (tmp_path / "kernel.txt").read_text()


def test_layout_probe_smoke():
    """layout_probe.py's blocked-layout kernel, every candidate, against float64 on odd shapes (interpreter); a
    candidate off by more than bf16 rounding fails the script."""
    assert "correctness: every candidate within" in run_script("layout_probe.py", "--smoke")


def test_attention_bench_smoke():
    """attention_bench.py's table on a tiny cache: the kernel (interpreter) within float64 rounding of sdpa."""
    row = next(line for line in run_script("attention_bench.py", "--smoke").splitlines() if line.startswith("| tiny"))
    assert float(row.strip("| ").split("|")[-1]) < 1e-5


def test_e2e_decode_smoke(tmp_path):
    """Every stage: a random model folder, its conversion, decode of the checkpoint and of a synthetic exact-transform
    model (with the step's profile), and generate() greedy and sampling next to transformers."""
    work, out = tmp_path / "work", tmp_path / "e2e.json"
    run_script("e2e_decode.py", "make", "--smoke", "--work", work)
    run_script("e2e_decode.py", "convert", "--smoke", "--work", work, "--transform", "none")
    run_script("e2e_decode.py", "decode", "--smoke", "--work", work, "--checkpoints", "none", "--synthetic", "exact",
               "--levels", "0,0.5", "--profile-levels", "0.5", "--out", out)
    decoded = json.loads(out.read_text())
    assert decoded["transformers_static_compile_ms"] is not None
    for label in ("runtime_ckpt-none", "runtime_synthetic-exact"):
        record = decoded[label]
        assert set(record["graph_decoder_ms"]) == {"0", "0.5"}
        assert 0.3 < record["realized_sparsity"]["0.5"] < 0.7
        assert isinstance(record["profile"]["0.5"], dict), record["profile"]  # not "failed: ..."
    assert isinstance(decoded["graph_decoder_plain_model_profile"], dict), decoded["graph_decoder_plain_model_profile"]
    run_script("e2e_decode.py", "generate", "--smoke", "--batches", "1,2", "--levels", "0,0.5", "--profile-levels", "0.5",
               "--out", tmp_path / "generate.json")
    generated = json.loads((tmp_path / "generate.json").read_text())
    for key in ("b1_0", "b1_0.5", "b2_0.5"):
        assert math.isfinite(generated[f"generate_greedy_ms_{key}"]) and math.isfinite(generated[f"generate_sample_ms_{key}"])
    for key in ("b1_0.5", "b2_0.5"):  # every batch asked for is profiled at the profile levels
        assert isinstance(generated[f"profile_{key}"], dict), generated[f"profile_{key}"]
    assert generated["generate_first_tokens_equal_to_transformers_b1_0.5"].endswith("of 32")


def test_cpu_decode_smoke():
    output = run_script("cpu_decode.py", "all", "--smoke")
    assert "| float32 | 64x96 | 1 |" in output and "| bfloat16 | 64x96 | 4 |" in output
    assert "| smoke | float32 |" in output and "| smoke | bfloat16 |" in output
    # the gather variants: each checked against the float64 product inside the script before it is timed
    assert "| 1024x2048 | 0.5 |" in run_script("cpu_decode.py", "gathers", "--smoke")


def test_few_token_products_smoke():
    """The variants agree with the float64 per-segment product before their times are printed."""
    rows = [line.split("|") for line in run_script("few_token_products.py", "--smoke").splitlines()
            if line.startswith("| tiny")]
    assert [int(row[2]) for row in rows] == [1, 2, 4, 8]
    assert all(float(row[8]) < 1e-5 for row in rows)


def test_fusion_probe_puts_the_stacked_masks_in_the_norms_kernel():
    """Inductor's Triton scheduler computes the few-token masked inputs in the norm's own kernel (the broadcast form
    before took a kernel of its own: the batch-4 profile's extra kernels)."""
    lines = run_script("fusion_probe.py").splitlines()
    runtime = next(line for line in lines if line.startswith("runtime"))
    broadcast = next(line for line in lines if line.startswith("broadcast"))
    assert ": 1 generated kernel(s)" in runtime and ": 2 generated kernel(s)" in broadcast


def test_accuracy_study_smoke(tmp_path):
    out, md = tmp_path / "accuracy.json", tmp_path / "accuracy.md"
    run_script("accuracy_study.py", "--smoke", "--work", tmp_path / "work", "--out", out, "--md", md, "--check-dense")
    models = {entry["label"]: entry for entry in json.loads(out.read_text())["models"]}
    assert set(models) == {"dense", "TEAL", "WINA pca"}
    for entry in models.values():
        assert all(math.isfinite(r["perplexity"]) for r in entry["results"])
    assert {r["sparsity"] for r in models["WINA pca"]["results"]} == {0.0, 0.5}
    assert "| WINA pca |" in md.read_text()
    assert "| WINA pca |" in run_script("accuracy_study.py", "--table-only", "--out", out)


def test_convert_memory_smoke(tmp_path):
    run_script("convert_memory.py", "--smoke", "--work", tmp_path / "work", "--out", tmp_path / "memory.json")
    runs = json.loads((tmp_path / "memory.json").read_text())["runs"]
    assert [r["mode"] for r in runs] == ["streamed", "in-memory"]
    assert all(r["peak_host_gib"] > 0 for r in runs) and runs[0]["bound_gib"] > 0


def test_gemma_transforms_smoke(tmp_path):
    output = run_script("gemma_transforms.py", BENCHMARKS / "assets" / "gemma3-270m", "--json", tmp_path / "cost.json")
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost["model_type"] == "gemma3_text" and 0 < cost["extra_per_layer_dense"] < 1
    assert "| 50% |" in output


def test_cross_text_smoke(tmp_path):
    """cross_text.py: conversions per (calibration text, row) including a hidden per-projection scoring, each
    evaluated on the other texts by two jobs whose parts are merged, cached in its JSON (a second run converts
    nothing), and the rule's table."""
    out = tmp_path / "cross.json"
    run_script("cross_text.py", "--smoke", "--jobs", "2", "--work", tmp_path / "work", "--out", out)
    results = json.loads(out.read_text())
    assert set(results["dense"]) == {"prose", "news", "code"}
    assert set(results["evaluations"]) == {f"{row} | prose | {held_out}" for held_out in ("news", "code")
                                           for row in ("WINA pca, reference scoring", "WINA pca, norms on o")}
    assert all(math.isfinite(r["perplexity"]) for by_level in results["evaluations"].values() for r in by_level.values())
    assert not any((tmp_path / "work").glob("wina-*")) and not any(tmp_path.glob("cross.part*"))
    again = run_script("cross_text.py", "--smoke", "--work", tmp_path / "work", "--out", out)
    assert "converting" not in again and "| WINA pca, norms on o | " in again


def test_moe_decode_smoke(tmp_path):
    """moe_decode.py: a tiny random MoE through generate() at level 0 and 50%, and the expert-rule table."""
    out = tmp_path / "moe.json"
    output = run_script("moe_decode.py", "cpu", "--smoke", "--breakdown", "--json", out)
    results = json.loads(out.read_text())
    assert math.isfinite(results["ms_per_token_0"]) and math.isfinite(results["ms_per_token_0.5"])
    assert "50% over level 0:" in output
    for row in results["step_breakdown_ms"].values():  # the modules' time is part of the step's
        assert 0 < row["routed experts"] and row["attention"] + row["routed experts"] + row["lm_head"] < row["step"]
    assert "| 32 | shrink |" in run_script("moe_decode.py", "rules", "--smoke")


def test_kernel_registers_compiles_for_a_gpu_that_is_not_here():
    """kernel_registers.py: a runtime kernel compiled for sm_90 with triton's own ptxas, its registers read back."""
    output = run_script("kernel_registers.py", "--only", "expert down default")
    row = next(line for line in output.splitlines() if line.startswith("| expert down default |"))
    warps, registers, spilled, resident = (int(cell) for cell in row.split("|")[2:6])
    assert warps == 4 and 16 <= registers <= 255 and spilled >= 0 and resident >= 1
