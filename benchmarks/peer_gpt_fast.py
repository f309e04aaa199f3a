"""The peers of issue 27's end-to-end table: TEAL's copy of gpt-fast, dense and with TEAL's public sparse GEMV
kernels, on Llama-3-8B's shapes with random fp16 weights, batch 1, greedy, ms per decoded token.

Their code is never committed or shipped: fetch FasterDecoding/TEAL and lay out, in the ignored `.peers/teal/`,
    .peers/teal/sparse_gemv.py       kernels/sparse_gemv.py without its compile-wrapper tail (also kernel_bench's)
    .peers/teal/gpt-fast/model.py    gpt-fast/model.py
(`git -C <mirror> show HEAD:kernels/sparse_gemv.py | head -241`, `git -C <mirror> show HEAD:gpt-fast/model.py`).
Their model file imports `kernels.sparse_gemv.SparseGEMV` (a wrapper that needs msgspec); this harness gives it
the kernel file instead and wraps TEAL's two launch functions as opaque custom ops of its own, so that
torch.compile treats each as one extern call, as TEAL's wrapper does.

Decoding follows gpt-fast's generate.py: one compiled function per token (model forward + argmax) with
`mode="reduce-overhead"` (CUDA graphs), `fullgraph=True`, inductor's coordinate-descent tuning on
(`--no-coordinate-descent` turns it off), a static KV cache. Sparse: every layer's q/k/v, o, gate, up and down
run TEAL's kernels with one threshold per matrix at the level's quantile of |x| over the prompt's own inputs
to it (captured in a dense prefill), the weights stored column-major as TEAL's kernels require. ms/token is
(time of N + 1 tokens - time of 1) / N after a warm-up, median of repeats (common.ms_per_token).

  python3 benchmarks/peer_gpt_fast.py --levels 0,0.5 --prompt 128 --new-tokens 256 --json $OUT/peers.json
"""

import argparse
import importlib.util
import os
import sys
import types

import torch

from common import PEERS_TEAL, copy_bandwidth, load_teal_kernels, ms_per_token, save_json, versions


def load_peers():
    """(TEAL's gpt-fast model module, TEAL's kernel module) from .peers/teal, or a one-line error."""
    kernel_file = os.path.join(PEERS_TEAL, "sparse_gemv.py")
    model_file = os.path.join(PEERS_TEAL, "gpt-fast", "model.py")
    missing = [p for p in (kernel_file, model_file) if not os.path.exists(p)]
    if missing:
        raise SystemExit(f"peer files missing: {', '.join(missing)} (see this script's docstring)")
    kernels = load_teal_kernels()
    kernels.SparseGEMV = kernels.SparseQKVGEMV = None  # the names model.py imports; the ops below replace them
    package = types.ModuleType("kernels")
    package.__path__ = []
    package.sparse_gemv = kernels
    sys.modules.setdefault("kernels", package)
    sys.modules.setdefault("kernels.sparse_gemv", kernels)
    return _module("teal_gpt_fast_model", model_file), kernels


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # torch.compile imports the module of every global it traces
    spec.loader.exec_module(module)
    return module


def teal_ops(kernels):
    """TEAL's launches as opaque ops (x [1, 1, in] at decode; a plain matmul for longer inputs, as TEAL's)."""

    @torch.library.custom_op("peer_teal::gemv", mutates_args=())
    def gemv(x: torch.Tensor, weight: torch.Tensor, threshold: float, sparsity_bin: int) -> torch.Tensor:
        if x.shape[1] != 1:
            return torch.matmul(x, weight.T)
        return kernels.splitk_sparse_gemv(x, weight, threshold, sparsity_bin)

    @gemv.register_fake
    def _(x, weight, threshold, sparsity_bin):
        return x.new_empty((x.shape[0], x.shape[1], weight.shape[0]))

    @torch.library.custom_op("peer_teal::qkv_gemv", mutates_args=())
    def qkv_gemv(x: torch.Tensor, weight: torch.Tensor, threshold_q: float, threshold_k: float,
                 threshold_v: float, sparsity_bin: int, kv_size: int) -> torch.Tensor:
        if x.shape[1] != 1:
            return torch.matmul(x, weight.T)
        return kernels.qkv_gemv(x, weight, threshold_q, threshold_k, threshold_v, sparsity_bin, kv_size)

    @qkv_gemv.register_fake
    def _(x, weight, threshold_q, threshold_k, threshold_v, sparsity_bin, kv_size):
        return x.new_empty((x.shape[0], x.shape[1], weight.shape[0]))

    return gemv, qkv_gemv


def random_gpt_fast(gpt_fast, device, dtype=torch.float16):
    torch.manual_seed(0)
    with torch.device(device):
        model = gpt_fast.Transformer(gpt_fast.ModelArgs.from_name("llama-3-8b")).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.02)
    return model.eval()


@torch.no_grad()
def prompt_inputs(model, prompt):
    """|x| of the prompt's inputs to every sparse-able linear, by (layer, name), from a dense prefill."""
    seen, hooks = {}, []
    for index, layer in enumerate(model.layers):
        for name, linear in (("qkv", layer.attention.wqkv), ("o", layer.attention.wo),
                             ("gate_up", layer.feed_forward.w1), ("down", layer.feed_forward.w2)):
            hooks.append(linear.register_forward_pre_hook(
                lambda _, args, key=(index, name): seen.__setitem__(key, args[0].detach().abs().float().flatten())))
    model(prompt, torch.arange(prompt.shape[1], device=prompt.device))
    for hook in hooks:
        hook.remove()
    return seen


@torch.no_grad()
def make_sparse(model, inputs, level: float, ops):
    """Every layer on TEAL's kernels, one threshold per matrix at the `level` quantile of its prompt inputs."""
    gemv, qkv_gemv = ops
    sparsity_bin = int(round(level * 100))

    def threshold(key):
        values = inputs[key]
        return float(torch.quantile(values[: 1 << 24], level))  # quantile's input limit

    for index, layer in enumerate(model.layers):
        attention, ffn = layer.attention, layer.feed_forward
        for linear in (attention.wqkv, attention.wo, ffn.w1, ffn.w3, ffn.w2):
            linear.weight.data = linear.weight.data.t().contiguous().t()  # column major: TEAL reads W^T rows
        q = threshold((index, "qkv"))
        attention.thresh_q = attention.thresh_k = attention.thresh_v = q
        attention.thresh_o = threshold((index, "o"))
        attention.sparsity_bin = sparsity_bin
        attention.gemv1, attention.gemv2 = qkv_gemv, gemv
        ffn.thresh_gate = ffn.thresh_up = threshold((index, "gate_up"))
        ffn.thresh_down = threshold((index, "down"))
        ffn.sparsity_bin = sparsity_bin
        ffn.gemv1 = ffn.gemv2 = gemv
        attention.apply_monkeypatch()
        ffn.apply_monkeypatch()


def decoder(model, prompt, new_tokens: int, compile: bool):
    """n -> greedy decode of n tokens after a (plain) prefill, gpt-fast's way; returns the tokens."""

    def one_token(token, position):
        return model(token, position)[:, -1].argmax(-1, keepdim=True)

    step = torch.compile(one_token, mode="reduce-overhead", fullgraph=True, dynamic=False) if compile else one_token
    length = prompt.shape[1]

    @torch.no_grad()
    def run(n):
        token = model(prompt, torch.arange(length, device=prompt.device))[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        for i in range(n - 1):
            # a clone: the compiled step's output lives in its CUDA graph's memory, overwritten by the next replay
            token = step(token, torch.tensor([length + i], device=prompt.device)).clone()
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="0,0.5", help="0 = gpt-fast dense; others: TEAL's kernels")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-coordinate-descent", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("peer_gpt_fast needs a CUDA GPU (TEAL's kernels are fp16 Triton kernels)")
    import torch._inductor.config as inductor

    inductor.coordinate_descent_tuning = not args.no_coordinate_descent
    inductor.triton.unique_kernel_names = True
    gpt_fast, kernels = load_peers()
    ops = teal_ops(kernels)
    results = {"device": torch.cuda.get_device_name(), "versions": versions(),
               "copy_bandwidth_bytes_per_s": copy_bandwidth(), "prompt": args.prompt, "new_tokens": args.new_tokens,
               "coordinate_descent_tuning": inductor.coordinate_descent_tuning}
    print(f"{results['device']}: copy bandwidth {results['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    prompt = torch.randint(3, 128000, (1, args.prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    for level in [float(x) for x in args.levels.split(",")]:
        model = random_gpt_fast(gpt_fast, "cuda")
        with torch.device("cuda"):  # gpt-fast makes its caches and causal mask on the default device
            model.setup_caches(1, args.prompt + args.new_tokens + 8)
        if level > 0:
            make_sparse(model, prompt_inputs(model, prompt), level, ops)
        ms, _ = ms_per_token(decoder(model, prompt, args.new_tokens, compile=True), args.new_tokens, args.repeats)
        name = "gpt_fast_dense" if level == 0 else f"gpt_fast_teal_{level:g}"
        results[f"{name}_ms"] = ms
        print(f"{name}: {ms:.2f} ms/token", flush=True)
        del model
        torch.compiler.reset()
        torch.cuda.empty_cache()
        save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
