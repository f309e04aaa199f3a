"""Probe for the GPU-only stall of generate() at sparse levels: the same decode engine compiled with
torch.compile on the CPU, the Triton kernels run by the interpreter (SparseLinear.KERNELS_ON_CPU), on a random
Llama at levels 0 and 0.5. Prints the time of a first (compiling) and a second run and whether the tokens
equal the eager loop's; run with TORCH_LOGS=recompiles to count recompilations.

    TORCH_LOGS=recompiles python benchmarks/experiments/compiled_engine_cpu.py

Output of 2026-12-02 in benchmarks/results/compiled_engine_cpu.txt (compiling takes minutes on 2 cores).
"""

import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before the kernels module is imported

import torch  # noqa: E402
from transformers import GenerationConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the random-model factory of the tests
from random_models import random_model  # noqa: E402
from winaconv.calibrate import uniform_levels  # noqa: E402
from winaconv.runtime_model import to_runtime_model, winaconv_section  # noqa: E402
from winaconv_runtime import sparse_linear  # noqa: E402
from winaconv_runtime.generation import DecodeEngine, DecodeSettings  # noqa: E402

sparse_linear.KERNELS_ON_CPU = True
# the runtime sends matrices under 1M weights to the dense product; force the kernel on these tiny ones
sparse_linear.use_sparse_kernel = lambda num_tokens, in_features, out_features: num_tokens == 1
kernel = sparse_linear.sparse_linear_triton
triton_calls = []  # counted in the eager runs only: a counter inside the compiled step would be guarded on


def counted(*args):
    triton_calls.append(1)
    return kernel(*args)
model, family = to_runtime_model(random_model("llama"), winaconv_section("teal", "none", ()))
ids = torch.randint(3, 120, (2, 24), generator=torch.Generator().manual_seed(0))
uniform_levels(model, family, ids, [0.5])
prompt, mask = ids[:1, :5], torch.ones_like(ids[:1, :5])
settings = DecodeSettings(GenerationConfig(max_new_tokens=12, do_sample=False), 5, None)
torch.set_grad_enabled(False)  # as generate() and GreedyDecoder run it
for level in (0.0, 0.5):
    model.set_sparsity(level)
    engine = DecodeEngine(model, 1, 64, compile=True, cuda_graph=False)
    for run in ("first run", "second run"):
        start = time.time()
        out = engine.run(prompt, mask, settings)
        print(level, run, f"{time.time() - start:.1f} s", flush=True)
    sparse_linear.sparse_linear_triton = counted
    eager = DecodeEngine(model, 1, 64, compile=False, cuda_graph=False).run(prompt, mask, settings)
    sparse_linear.sparse_linear_triton = kernel
    print(level, "equal to eager:", torch.equal(out, eager), "| Triton op calls in the eager runs so far:", len(triton_calls), flush=True)
