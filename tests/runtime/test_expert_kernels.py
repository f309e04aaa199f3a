"""The grouped expert kernels (runtime/expert_kernels.py) under TRITON_INTERPRET=1, every memory access
bounds-checked, against a float64 reference: odd expert counts and widths, top-k 1/2/8, repeated experts in a
batch, inputs split over several chunks; the in-kernel reductions leave their tickets at zero.

TRITON_INTERPRET must be set before the kernels are imported; if another test module imported them first, the
in-process tests are skipped and one test runs this file again in a fresh subprocess.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from winaconv_runtime import expert_kernels as EK  # noqa: E402
from winaconv_runtime.kernels import reduction_tickets  # noqa: E402

from interpreter_bounds import checked_where_possible, rerun_under_interpreter  # noqa: E402
from support import reference_experts  # noqa: E402

silu = torch.nn.functional.silu

_INTERPRETED = EK.HAS_TRITON and type(getattr(EK, "_gate_up_kernel", None)).__name__ == "InterpretedFunction"
needs_interp = pytest.mark.skipif(not _INTERPRETED, reason="triton missing, or imported before TRITON_INTERPRET=1 "
                                  "(covered by test_expert_kernel_in_fresh_subprocess)")

# (experts, hidden, width, top_k, tokens)
CASES = [(5, 72, 40, 1, 3), (7, 64, 48, 2, 4), (9, 96, 33, 8, 2), (3, 40, 24, 2, 5)]


def _case(experts, hidden, width, top_k, tokens, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * width, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(experts, hidden, width, generator=g) / width ** 0.5
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    index[-1] = index[0]  # a repeated expert set in the batch
    weights = torch.rand(tokens, top_k, generator=g)
    level = torch.quantile(x.abs().flatten(), sparsity).item() if sparsity else 0.0
    tau_gate_up = level * torch.rand(experts, 2, hidden, generator=g) * 2
    tau_down = 0.05 * sparsity * torch.rand(experts, width, generator=g) * 2
    tau_gate_up[0, 1, :3] = float("inf")  # never kept
    return x, index, weights, gate_up, down, tau_gate_up, tau_down


# the default tiles (one input chunk at these widths), and small ones: several chunks, the last one ragged, with
# gate and up in one program or apart
TILES = [EK.TILES, EK.ExpertTiles(block_n=32, block_k=16, iters=2, num_warps=4),
         EK.ExpertTiles(block_n=32, block_k=16, iters=2, num_warps=4, apart=1)]


@needs_interp
@pytest.mark.parametrize("experts,hidden,width,top_k,tokens", CASES)
@pytest.mark.parametrize("sparsity", [0.0, 0.6])
@pytest.mark.parametrize("tiles", TILES, ids=["default-tiles", "small-tiles", "small-tiles-apart"])
def test_grouped_kernel_equals_the_float64_reference(experts, hidden, width, top_k, tokens, sparsity, tiles):
    x, index, weights, gate_up, down, tau_gate_up, tau_down = _case(experts, hidden, width, top_k, tokens, sparsity,
                                                                    seed=experts * 10 + top_k)
    gate_up_t = gate_up.transpose(1, 2).contiguous()  # W^T rows, as the runtime lays them out
    down_t = down.transpose(1, 2).contiguous()
    checked = checked_where_possible()
    with checked:
        out = EK.grouped_experts_triton(x, index, weights, gate_up_t, down_t, tau_gate_up, tau_down,
                                        silu, tiles)
    reference = reference_experts(x, index, weights, gate_up, down, tau_gate_up, tau_down, silu, torch.float32)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (out.double() - reference).abs().max() <= 1e-5 * max(reference.abs().max().item(), 1.0)
    assert int(reduction_tickets(x.device).abs().sum()) == 0  # every block's last program reset its ticket


@needs_interp
def test_bfloat16_experts_are_within_rounding_and_repeat_bit_for_bit():
    x, index, weights, gate_up, down, tau_gate_up, tau_down = _case(7, 64, 48, 2, 4, 0.5, seed=9)
    bf = [t.bfloat16() for t in (x, weights, gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous())]
    small = EK.ExpertTiles(block_n=16, block_k=16, iters=1, num_warps=4)  # four chunks per pair
    out = EK.grouped_experts_triton(bf[0], index, bf[1], bf[2], bf[3], tau_gate_up, tau_down, silu, small)
    again = EK.grouped_experts_triton(bf[0], index, bf[1], bf[2], bf[3], tau_gate_up, tau_down, silu, small)
    reference = reference_experts(bf[0].float(), index, bf[1].float(), gate_up.bfloat16().float(),
                                  down.bfloat16().float(), tau_gate_up, tau_down, silu, torch.float32)
    assert out.dtype == torch.bfloat16 and torch.equal(out, again)  # fixed-order reductions
    assert (out.double() - reference).abs().max() <= 2 ** -6 * reference.abs().max()


@needs_interp
def test_calls_without_tiles_take_the_module_tiles_at_call_time(monkeypatch):
    """A benchmark sets EK.TILES (and EK.DOWN_TILES) before building a model (moe_decode.py gpu --tiles,
    --down-tiles): calls that pass no tiles must use them. The tiles' chunking orders the float32 sums, so the
    default's result differs in its last bits."""
    x, index, weights, gate_up, down, tau_gate_up, tau_down = _case(7, 64, 48, 2, 4, 0.5, seed=9)
    gate_up_t, down_t = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    small = EK.ExpertTiles(block_n=16, block_k=16, iters=1, num_warps=4, apart=1)

    def run(*tiles):
        return EK.grouped_experts_triton(x, index, weights, gate_up_t, down_t, tau_gate_up, tau_down, silu, *tiles)

    default, chosen = run(EK.TILES), run(small)
    assert not torch.equal(default, chosen)
    monkeypatch.setattr(EK, "TILES", small)
    assert torch.equal(run(), chosen)
    # the down launch's own tiles (DOWN_TILES), where a benchmark sets them apart from gate/up's
    split = run(EK.ExpertTiles(), small)
    assert not torch.equal(split, default)
    monkeypatch.setattr(EK, "TILES", EK.ExpertTiles())
    monkeypatch.setattr(EK, "DOWN_TILES", small)
    assert torch.equal(run(), split)
    reference = reference_experts(x, index, weights, gate_up, down, tau_gate_up, tau_down, silu, torch.float32)
    assert (split.double() - reference).abs().max() <= 1e-5 * max(reference.abs().max().item(), 1.0)


def test_other_activations_are_refused():
    assert EK.is_silu(silu) and EK.is_silu(torch.nn.SiLU()) and not EK.is_silu(torch.nn.GELU())
    x, index, weights, gate_up, down, tau_gate_up, tau_down = _case(3, 40, 24, 2, 5, 0.0, seed=2)
    with pytest.raises(ValueError, match="SiLU"):
        EK.grouped_experts_triton(x, index, weights, gate_up.transpose(1, 2), down.transpose(1, 2), tau_gate_up,
                                  tau_down, torch.nn.GELU())


@needs_interp
def test_grouped_kernel_reads_experts_in_place_of_the_model_parameters():
    """The runtime passes transposed views of the experts' own parameters (no copy): strides other than
    contiguous ones along the expert dimension work."""
    x, index, weights, gate_up, down, tau_gate_up, tau_down = _case(5, 48, 20, 2, 3, 0.5, seed=1)
    stored = gate_up.transpose(1, 2).contiguous().transpose(1, 2)  # the parameter as laid out by the runtime
    stored_down = down.transpose(1, 2).contiguous().transpose(1, 2)
    out = EK.grouped_experts_triton(x, index, weights, stored.transpose(1, 2), stored_down.transpose(1, 2),
                                    tau_gate_up, tau_down, silu)
    reference = reference_experts(x, index, weights, gate_up, down, tau_gate_up, tau_down, silu, torch.float32)
    assert (out.double() - reference).abs().max() <= 1e-5 * reference.abs().max()


@needs_interp
def test_level_zero_thresholds_keep_every_channel_through_stride_zero_views():
    """Level 0 on the GPU runs the grouped kernel with sparse_experts._keep_all's thresholds: one -inf row
    broadcast over experts and segments (stride 0), which must equal the dense experts."""
    from winaconv_runtime.sparse_experts import _keep_all

    x, index, weights, gate_up, down, _, _ = _case(7, 72, 40, 2, 3, 0.0, seed=5)
    experts = torch.nn.Module()
    experts.gate_up_proj, experts.down_proj = torch.nn.Parameter(gate_up), torch.nn.Parameter(down)
    tau_gate_up, tau_down = _keep_all(experts)
    assert tau_gate_up.stride()[:2] == (0, 0) and tau_down.stride(0) == 0
    out = EK.grouped_experts_triton(x, index, weights, gate_up.transpose(1, 2).contiguous(),
                                    down.transpose(1, 2).contiguous(), tau_gate_up, tau_down, silu)
    zeros = torch.full_like(tau_gate_up, -1.0), torch.full_like(tau_down, -1.0)
    reference = reference_experts(x, index, weights, gate_up, down, *zeros, silu, torch.float32)
    assert (out.double() - reference).abs().max() <= 1e-5 * max(reference.abs().max().item(), 1.0)



@pytest.mark.skipif(_INTERPRETED or os.environ.get("WINACONV_MOE_KERNEL_SUBPROCESS") == "1" or not EK.HAS_TRITON,
                    reason="the in-process tests run under the interpreter")
def test_expert_kernel_in_fresh_subprocess():
    rerun_under_interpreter(__file__, "WINACONV_MOE_KERNEL_SUBPROCESS")
