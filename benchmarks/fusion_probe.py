"""How many kernels inductor's Triton scheduler makes of a norm followed by a few-token product's masks (no GPU needed).

At 2-8 tokens a sparse level runs `sparse_linear.stacked_masked_products` after the RMSNorm that makes its input
(q/k/v, gate/up). Whether the compiled step computes the masked copies in the norm's own kernel or in a kernel of
their own is a scheduling decision, made before any code runs: this script compiles norm -> masks -> product with
inductor's Triton backend selected for the CPU (`cpu_backend = "triton"`), records the scheduler's nodes after
fusion, and stops before code generation (which would need a GPU). It compares the runtime's function with the
earlier broadcast form of the same masks:
    python3 benchmarks/fusion_probe.py          (in benchmarks/, with runtime/ importable as winaconv_runtime)
"""
from __future__ import annotations

import itertools

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from torch._inductor import scheduler

from winaconv_runtime.sparse_linear import stacked_masked_products

TOKENS, HIDDEN, SIZES = 4, 256, (256, 64, 64)  # q/k/v-like segments


class Stop(Exception):
    """Raised once the fused nodes are known: code generation would need a GPU driver."""


def broadcast_masks(x, weight, bias, tau, sizes):
    """The form before 2026-12-08: one [segments, tokens, in] mask product."""
    stacked = (x.unsqueeze(0) * (x.abs().unsqueeze(0) > tau.unsqueeze(1))).reshape(len(sizes) * x.shape[0], -1)
    y = F.linear(stacked, weight, bias).view(len(sizes), x.shape[0], -1)
    ends = list(itertools.accumulate(sizes))
    return [y[s, :, end - size:end] for s, (size, end) in enumerate(zip(sizes, ends))]


def kernels_after_fusion(products) -> list[str]:
    """Names of the scheduled kernels (fused groups and extern calls) of norm(residual + x) -> products."""
    weight = torch.randn(sum(SIZES), HIDDEN)
    norm_weight = torch.randn(HIDDEN)
    tau = torch.rand(len(SIZES), HIDDEN)

    def step(x, residual):
        hidden = x + residual
        normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight
        return products(normed, weight, None, tau, SIZES)

    found = []
    original = scheduler.Scheduler.fuse_nodes

    def recording(self, nodes):
        nodes = original(self, nodes)
        found.extend(type(node).__name__ + ":" + node.get_name() for node in nodes
                     if not isinstance(node, scheduler.NopKernelSchedulerNode))
        raise Stop

    torch._dynamo.reset()
    scheduler.Scheduler.fuse_nodes = recording
    try:
        with inductor_config.patch(cpu_backend="triton"):
            torch.compile(step, fullgraph=True)(torch.randn(TOKENS, HIDDEN), torch.randn(TOKENS, HIDDEN))
    except Exception as error:  # noqa: BLE001 - dynamo wraps Stop in its own error
        if "Stop" not in repr(error) and not isinstance(error, Stop):
            raise
    finally:
        scheduler.Scheduler.fuse_nodes = original
    return found


def main():
    print(f"torch {torch.__version__}; norm -> masks of {len(SIZES)} segments -> one product, {TOKENS} tokens")
    for name, products in (("runtime (stacked_masked_products)", stacked_masked_products),
                           ("broadcast masks (before 2026-12-08)", broadcast_masks)):
        kernels = kernels_after_fusion(products)
        generated = [k for k in kernels if not k.startswith("ExternKernel")]
        print(f"{name}: {len(generated)} generated kernel(s) + {len(kernels) - len(generated)} extern: {kernels}")


if __name__ == "__main__":
    main()
