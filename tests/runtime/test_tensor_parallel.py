"""Tensor parallelism through transformers' tp_plan: `torchrun --nproc-per-node 2` (gloo, CPU) loads a saved
checkpoint of every family with tp_plan="auto", and its logits and greedy tokens are the single-process model's.

One launch checks every case (each launch spends ~20 s starting two Python processes): tests/tp_worker.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from winaconv_runtime.architectures import PROJECTIONS

from models import ALL_FAMILIES, random_model, runtime_with_levels
from support import edit_config, run_cli, write_checkpoint
from tp_worker import decode_step, load, measure

WORKER = Path(__file__).resolve().parents[1] / "tp_worker.py"


def saved_checkpoint(family: str, folder: Path, transform: str = "none") -> Path:
    """A random model of `family` as a winaconv checkpoint with a 50% level (paper scoring: column norms on all
    seven projections, so every sharded norm is used)."""
    model, fam = runtime_with_levels(random_model(family), "wina", [0.5], PROJECTIONS, transform)
    folder.mkdir(parents=True)
    write_checkpoint(model, fam, folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def gather_without_timing():
    """The checkpoints' runtimes (imported here) run the CPU row gather on every decode-sized product, as the ranks
    do, without timing each shape first: the test is about decisions, not speed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WINACONV_CPU_GATHER", "always")
        yield


@pytest.fixture(scope="module")
def tensor_parallel_run(tmp_path_factory):
    """(cases, {rank: results}) of one torchrun launch over every case."""
    root = tmp_path_factory.mktemp("tp")
    cases = {family: {"folder": str(saved_checkpoint(family, root / family))} for family in ALL_FAMILIES}
    cases["llama-exact"] = {"folder": str(saved_checkpoint("llama", root / "llama-exact", "exact"))}
    no_plan = saved_checkpoint("llama", root / "no-plan")
    edit_config(no_plan, lambda config: config.update(base_model_tp_plan={}))
    cases["no-plan"] = {"folder": str(no_plan)}
    # last: it switches its checkpoint's runtime to the GPU decode path (interpreted kernels, joined q/k/v)
    cases["kernels"] = {"folder": str(saved_checkpoint("qwen2", root / "kernels")), "dtype": "float32", "kernels": True}
    (root / "cases.json").write_text(json.dumps(cases))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(WORKER),
               str(root / "cases.json"), str(root)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return cases, {rank: torch.load(root / f"rank{rank}.pt") for rank in (0, 1)}


def assert_float64_equal(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal up to the order of float64 sums (the row-wise shards' partial products are added across ranks)."""
    assert got.shape == expected.shape, what
    assert (got - expected).abs().max() <= 1e-12 * expected.abs().max(), what


@pytest.mark.parametrize("name", ALL_FAMILIES + ["llama-exact"])
def test_two_ranks_equal_the_single_process_model(tensor_parallel_run, name):
    cases, ranks = tensor_parallel_run
    expected = measure(load(cases[name]["folder"], tensor_parallel=False))
    assert not torch.equal(expected["logits_50"], expected["logits_0"]), "the 50% level must change the logits"
    for rank, results in ranks.items():
        got = results[name]
        for key in ("logits_50", "short_logits_50", "autograd_logits_50", "logits_0"):
            assert_float64_equal(got[key], expected[key], f"{name} {key} on rank {rank}")
        for key in ("tokens_50", "tokens_0"):
            assert torch.equal(got[key], expected[key]), f"{name} {key} on rank {rank}"


def test_a_family_without_tp_plan_is_one_line(tensor_parallel_run):
    _, ranks = tensor_parallel_run
    for results in ranks.values():
        message = results["no-plan"]["error"]
        assert message.startswith("TensorParallelError: llama has no tensor-parallel plan"), message
        assert "self_attn.q_proj" in message and "\n" not in message


def test_joined_shards_take_one_launch_and_keep_the_rule(tensor_parallel_run):
    """The GPU decode path (interpreted kernels on CPU tensors): each rank joins its q/k/v and gate/up shards into
    one launch, the logits are the single-process masked products', and dynamo traces the step with the
    collectives in one graph."""
    cases, ranks = tensor_parallel_run
    reference = decode_step(load(cases["kernels"]["folder"], tensor_parallel=False, dtype=torch.float32))
    config = json.loads((Path(cases["kernels"]["folder"]) / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    q, kv, inter = (config["num_attention_heads"] * head_dim // 2, config["num_key_value_heads"] * head_dim // 2,
                    config["intermediate_size"] // 2)
    per_layer = [(q, q + kv, q + 2 * kv), (config["hidden_size"],), (inter, 2 * inter), (config["hidden_size"],)]
    for results in ranks.values():
        torch.testing.assert_close(results["kernels"]["decode_logits"], reference, rtol=1e-4, atol=1e-5)
        assert results["kernels"]["launches"] == per_layer * config["num_hidden_layers"]
        torch.testing.assert_close(results["kernels"]["compiled_decode_logits"], results["kernels"]["decode_logits"])


def test_inspect_and_the_model_card_say_how_it_shards(checkpoint_copy):
    from winaconv.checkpoint.model_card import build_model_card

    folder = checkpoint_copy()  # a converted tiny Llama
    result = run_cli("inspect", folder)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "tensor parallel" in line)
    assert 'yes (torchrun, tp_plan="auto"): q_proj, k_proj, v_proj' in line, result.output
    card = str(build_model_card(folder, "a/b"))
    assert "**Tensor parallelism** (a model larger than one GPU): yes" in card and 'tp_plan="auto"' in card
    edit_config(folder, lambda config: config.update(base_model_tp_plan={}))
    assert "no: the tensor-parallel plan leaves self_attn.q_proj" in " ".join(run_cli("inspect", folder).output.split())


def test_the_gpu_benchmark_runs_on_two_cpu_ranks(tmp_path):
    """benchmarks/tp_decode.py --smoke: the script of the GPU measurement, on a tiny config (gloo), end to end."""
    out = tmp_path / "smoke.json"
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "tp_decode.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), "--smoke",
               "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    record = json.loads(out.read_text())["smoke"]
    assert record["engine"] == {key: "generate()" for key in ("0", "0.5", "0.25", "0.4", "0.65")}
    assert all(ms > 0 for ms in record["generate_ms"].values()) and record["transformers_tp_static_compile_ms"] > 0
    assert record["generate_first_tokens_equal_to_transformers_loop"] == "32 of 32 at level 0.5"
