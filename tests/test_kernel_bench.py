"""benchmarks/kernel_bench.py's table code, run on small shapes on the CPU (Triton's interpreter, one launch per
timing instead of a CUDA graph), so the script cannot rot between GPU sessions."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
kernel_bench = pytest.importorskip("kernel_bench")


def test_kernel_table_runs_and_follows_the_runtime_choice(monkeypatch):
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
