"""Run by test_tensor_parallel.py under `torchrun --nproc-per-node 2` (gloo, CPU), not a test module: loads each
case's checkpoint with tp_plan="auto" and saves what the test compares with the single-process model, one file
per rank. measure() and decode_step() are the same calls on both sides.

    python -m torch.distributed.run --nproc-per-node 2 tests/tp_worker.py CASES.json OUT_FOLDER
"""

import json
import os
import sys
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

PROMPT = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))  # masked dense product
SHORT = PROMPT[:1, :6]  # few tokens: the CPU row gather


def load(folder, tensor_parallel: bool, dtype=torch.float64, sparsity=0.5):
    options = dict(trust_remote_code=True, dtype=dtype, sparsity=sparsity)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers prefers DistributedConfig(tp_plan=...)
        model = AutoModelForCausalLM.from_pretrained(folder, **options, **(dict(tp_plan="auto") if tensor_parallel else {}))
    return model.eval()


@torch.no_grad()
def measure(model) -> dict:
    """Logits at the checkpoint's 50% level (autograd off and on) and at level 0, greedy generate() tokens at both."""
    model.set_sparsity(0.5)
    found = {"logits_50": model(PROMPT).logits, "short_logits_50": model(SHORT).logits,
             "tokens_50": model.generate(SHORT, max_new_tokens=10, do_sample=False, pad_token_id=0)}
    with torch.enable_grad():  # transformers' wrappers hand the sparse linears local tensors with autograd on too
        found["autograd_logits_50"] = model(PROMPT).logits.detach()
    model.set_sparsity(0)
    found["logits_0"] = model(PROMPT).logits
    found["tokens_0"] = model.generate(SHORT, max_new_tokens=10, do_sample=False, pad_token_id=0)
    return found


@torch.no_grad()
def decode_step(model, compiled: bool = False):
    """Logits of one decode step after a prefill of SHORT[:, :-1]; compiled: the step traced by dynamo in one graph
    (the GPU engine compiles it)."""
    past = model(SHORT[:, :-1], use_cache=True).past_key_values
    step = lambda token, cache: model(token, past_key_values=cache).logits  # noqa: E731
    if compiled:
        step = torch.compile(step, backend="eager", fullgraph=True)
    return step(SHORT[:, -1:], past)


def kernels_on_cpu(model) -> list:
    """Switch the checkpoint's own runtime to the GPU decode path on CPU tensors (interpreted Triton kernels, every
    one-token product sparse) and lay the weights out for it; returns the list each launch's segment ends join."""
    runtime = sys.modules[type(model.model.layers[0].mlp.down_proj).__module__]
    runtime._uses_kernels = lambda tensor: True
    runtime.use_sparse_kernel = lambda tokens, n_in, n_out: tokens == 1
    launches, launch = [], runtime.sparse_linear_triton

    def counted(x, weight_t, tau, segment_ends, bias=None, kept_percent=100):
        launches.append(tuple(segment_ends))
        return launch(x, weight_t, tau, segment_ends, bias, kept_percent)

    runtime.sparse_linear_triton = counted
    model.set_sparsity(0.5)
    return launches


def main(cases_path: str, out: str) -> None:
    results = {}
    for name, case in json.loads(Path(cases_path).read_text()).items():
        try:
            model = load(case["folder"], True, getattr(torch, case.get("dtype", "float64")))
        except Exception as error:  # noqa: BLE001  (the no-plan case: its message is the result)
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        if case.get("kernels"):
            launches = kernels_on_cpu(model)
            results[name] = {"decode_logits": decode_step(model), "launches": list(launches),
                             "compiled_decode_logits": decode_step(model, compiled=True)}
        else:
            results[name] = measure(model)
    torch.save(results, Path(out) / f"rank{os.environ['RANK']}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
