"""Mixture-of-experts decode speed: batch-1 greedy generate() at each level, and (GPU) the grouped expert kernel.

  python3 benchmarks/moe_decode.py cpu            # 16 experts, top-2, hidden 1024: level 0 and 50%, ms/token
  python3 benchmarks/moe_decode.py cpu --smoke    # a tiny MoE, seconds (tests/test_benchmarks.py)
  python3 benchmarks/moe_decode.py cpu --breakdown  # also the step's time in attention, experts and lm_head
  python3 benchmarks/moe_decode.py gpu            # Qwen3-30B-A3B's config, random bf16 weights, 0/25/40/50/65%,
                                                  # transformers' static cache + compile, the weight-read floor
  python3 benchmarks/moe_decode.py kernels        # top-8 of 128 experts, 2048 -> 2x768 and 768 -> 2048, against
                                                  # dense products of the routed experts
  python3 benchmarks/moe_decode.py rules          # expert calibration rules (shrink / own / pooled): output error
                                                  # on held-out tokens at 50% after few calibration tokens (CPU)
  add --json PATH to keep the raw figures.

Models are random (Qwen3-MoE architecture, no download) and become the runtime's classes on the same weights
(common.synthetic_runtime's way: TEAL scoring, every projection and every routed expert at the level's
sparsity, thresholds from the prompt's own activations). ms/token is (time of N+1 tokens - time of 1) / N,
medians over repeats; level 0 and 50% are interleaved within each repeat on the CPU, where load is noisy.
"""

import argparse
import json
import statistics
import sys
import time

import torch

from common import (copy_bandwidth, decode_step_ms, default_dtype, graph_time, hf_generate, median_ms, ms_per_token,
                    profile_step, save_json, versions)

CPU_MOE = dict(hidden_size=1024, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=1024,
               intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
               head_dim=128, vocab_size=8192, max_position_embeddings=1024)
SMOKE_MOE = dict(CPU_MOE, hidden_size=64, num_experts=5, moe_intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, head_dim=16, vocab_size=256)
# Qwen3-30B-A3B's published config (hidden 2048, 48 layers, 128 experts of width 768, top-8, 32/4 heads of 128)
QWEN3_30B_A3B = dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                     intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                     head_dim=128, vocab_size=151936, max_position_embeddings=40960, norm_topk_prob=True,
                     rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)
GPU_LEVELS = (0.0, 0.25, 0.4, 0.5, 0.65)
# ExpertTiles fields (block_n, block_k, iters, num_warps[, apart]) the kernels table times beside the default
# (n32k512i1 since 12-07; n128k32i8 was the default before: results.md, "Mixture of experts")
EXPERT_CANDIDATES = {
    "n128k32i8": (128, 32, 8, 4), "n64k64i4": (64, 64, 4, 4), "n128k16i8": (128, 16, 8, 4),
    # the dense linears' tile geometry (one wide masked load of many rows per program)
    "n64k512i1": (64, 512, 1, 4), "n64k256i1": (64, 256, 1, 4), "n128k256i1": (128, 256, 1, 4),
    "n32k512i1": (32, 512, 1, 4), "n64k128i2": (64, 128, 2, 4),
    # around n32k512i1: narrower, shorter, more warps a program (fewer accumulator registers a thread), apart
    "n16k512i1": (16, 512, 1, 4), "n32k256i1": (32, 256, 1, 4), "n32k512i1w8": (32, 512, 1, 8),
    "n16k1024i1w8": (16, 1024, 1, 8), "n32k512i1a": (32, 512, 1, 4, 1),
    # gate and up read by different programs ("a": apart)
    "n128k32i8a": (128, 32, 8, 4, 1), "n64k256i1a": (64, 256, 1, 4, 1), "n128k128i2a": (128, 128, 2, 4, 1),
    "n64k512i1a": (64, 512, 1, 4, 1), "n256k32i4w8a": (256, 32, 4, 8, 1)}
TILE_CHOICES = {"default": (), **EXPERT_CANDIDATES}  # --tiles / --down-tiles ("default": the runtime's own)


def random_moe(shape: dict, dtype, device: str):
    """A Qwen3-MoE of `shape` with random weights (std 0.02, a router that is not flat), built on `device`."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**shape, dtype=dtype)).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.02 if not name.endswith("mlp.gate.weight") else 0.2)
    return model.eval()


def runtime_model(base, prompt, levels):
    from winaconv.convert.calibrate import uniform_levels
    from winaconv.convert.runtime_model import to_runtime_model, winaconv_section

    model, family = to_runtime_model(base, winaconv_section("teal", "none", ()))
    # base keeps the runtime's own Parameter objects: the runtime lays the experts out anew once (on the GPU),
    # and a base holding the old tensors would keep a second 57 GiB copy of them
    shared = dict(model.named_parameters())
    for name, _ in list(base.named_parameters()):
        if name in shared:
            module_name, _, attr = name.rpartition(".")
            setattr(base.get_submodule(module_name), attr, shared[name])
    uniform_levels(model, family, prompt, [x for x in levels if x > 0])
    return model


def active_bytes(config, sparsity: float = 0.0) -> int:
    """Weights one decode token reads: attention and its top-k experts, the decoder linears at (1 - sparsity),
    plus the router, norms, one embedding row and the dense lm_head."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    linears = layers * (2 * hidden * q + 2 * hidden * kv + 3 * config.num_experts_per_tok * hidden
                        * config.moe_intermediate_size)
    dense = layers * config.num_experts * hidden + config.vocab_size * hidden + hidden
    return int((linears * (1 - sparsity) + dense) * 2)


def generate_fn(model, prompt):
    return lambda n: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, pad_token_id=0)


def cpu(args) -> dict:
    shape = SMOKE_MOE if args.smoke else CPU_MOE
    new_tokens, repeats = (4, 1) if args.smoke else (args.tokens, args.repeats)
    base = random_moe(shape, torch.float32, "cpu")
    prompt = torch.randint(3, shape["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(0))
    model = runtime_model(base, prompt, [0.5])
    results = {"shape": shape, "versions": versions(), "new_tokens": new_tokens, "repeats": repeats}
    timings = {0.0: [], 0.5: []}
    for _ in range(repeats):  # interleaved: both levels see the same load
        for level in timings:
            model.set_sparsity(level)
            timings[level].append(ms_per_token(generate_fn(model, prompt), new_tokens, repeats=1)[0])
    for level, values in timings.items():
        results[f"ms_per_token_{level:g}"] = statistics.median(values)
        results[f"ms_per_token_{level:g}_all"] = values
    results["speedup_0.5"] = results["ms_per_token_0"] / results["ms_per_token_0.5"]
    print(f"| level | ms/token (median of {repeats}) |\n|---|---|")
    for level in timings:
        print(f"| {level:g} | {results[f'ms_per_token_{level:g}']:.2f} |")
    print(f"50% over level 0: {results['speedup_0.5']:.2f}x")
    if args.breakdown:
        results["step_breakdown_ms"] = _cpu_breakdown(model, prompt, tuple(timings), new_tokens, repeats)
    return results


def _cpu_breakdown(model, prompt, levels, steps: int, repeats: int) -> dict:
    """Wall ms per decode step inside each kind of module (forward hooks around every layer's attention and
    routed experts, and the lm_head), levels interleaved, medians over repeats: where the sparse level's time goes."""
    decoder = _decoder(model, prompt, steps)
    modules = {"attention": [layer.self_attn for layer in model.model.layers],
               "routed experts": [layer.mlp.experts for layer in model.model.layers], "lm_head": [model.lm_head]}
    spent, started = {}, {}
    for kind, found in modules.items():
        for module in found:
            module.register_forward_pre_hook(lambda m, a: started.__setitem__(m, time.perf_counter()))
            module.register_forward_hook(lambda m, a, o, kind=kind: spent.__setitem__(
                kind, spent.get(kind, 0.0) + time.perf_counter() - started[m]))
    figures = {level: {kind: [] for kind in (*modules, "step")} for level in levels}
    for level in levels:
        model.set_sparsity(level)
        decoder.generate(prompt, 4)  # warm this level
    for _ in range(repeats):
        for level in levels:
            model.set_sparsity(level)
            decoder.generate(prompt, 1)  # prefill; the timed steps continue it
            spent.clear()
            start = time.perf_counter()
            for _ in range(steps):
                decoder.engine.step()
            figures[level]["step"].append((time.perf_counter() - start) / steps * 1e3)
            for kind in modules:
                figures[level][kind].append(spent.get(kind, 0.0) / steps * 1e3)
    table = {f"{level:g}": {kind: statistics.median(v) for kind, v in found.items()} for level, found in figures.items()}
    print("| level | " + " | ".join(f"{kind} ms" for kind in (*modules, "step")) + " |")
    print("|---|" + "---|" * (len(modules) + 1))
    for level, row in table.items():
        print(f"| {level} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |")
    return table


def gpu(args) -> dict:
    if args.tiles or args.down_tiles:  # before the model is built and compiled: the kernels read them at each call
        from winaconv_runtime import expert_kernels
        if args.tiles:
            expert_kernels.TILES = expert_kernels.ExpertTiles(*TILE_CHOICES[args.tiles])
        if args.down_tiles:
            expert_kernels.DOWN_TILES = expert_kernels.ExpertTiles(*TILE_CHOICES[args.down_tiles])
        print(f"expert tiles {args.tiles or 'default'}: {expert_kernels.TILES}; down "
              f"{args.down_tiles or 'the same'}", flush=True)
    base = random_moe(QWEN3_30B_A3B, torch.bfloat16, "cuda")
    prompt = torch.randint(3, 1000, (1, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    bandwidth = copy_bandwidth()  # bytes moved per second; a read-only stream moves about as many
    results = {"versions": versions(), "device": torch.cuda.get_device_name(), "copy_bandwidth_bytes_per_s": bandwidth,
               "new_tokens": args.tokens, "tiles": args.tiles or "default", "down_tiles": args.down_tiles or "same",
               "weights_gib": _gib(torch.cuda.memory_allocated())}
    print(f"{results['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, weights {results['weights_gib']:.1f} GiB",
          flush=True)
    if not args.no_baselines:
        compiled = hf_generate(base, prompt, cache_implementation="static")
        results["transformers_static_compile_ms"] = ms_per_token(compiled, args.tokens, args.repeats)[0]
        print(f"transformers static cache + compile (base model): {results['transformers_static_compile_ms']:.2f} "
              f"ms/token", flush=True)
        del compiled
        _release_compiled(base)
    levels = [float(x) for x in args.levels.split(",")] if args.levels else list(GPU_LEVELS)
    profile_levels = [float(x) for x in args.profile_levels.split(",")] if args.profile_levels else []
    model = runtime_model(base, prompt, levels)
    print("| level | generate() ms/token | weight-read floor ms | GPU memory GiB |\n|---|---|---|---|", flush=True)
    for level in levels:
        model.set_sparsity(level)
        ms = ms_per_token(generate_fn(model, prompt), args.tokens, args.repeats)[0]
        floor = active_bytes(base.config, level) / bandwidth * 1e3
        results[f"generate_ms_{level:g}"], results[f"floor_ms_{level:g}"] = ms, floor
        results[f"max_allocated_gib_{level:g}"] = _gib(torch.cuda.max_memory_allocated())
        print(f"| {level:g} | {ms:.2f} | {floor:.2f} | {results[f'max_allocated_gib_{level:g}']:.1f} |", flush=True)
        results[f"step_ms_{level:g}"] = _step_ms(model, prompt, args.tokens)
        print(f"  decode step alone (prefill left out): {results[f'step_ms_{level:g}']:.2f} ms", flush=True)
        if level in profile_levels:
            results[f"profile_{level:g}"] = _profile(model, prompt, args.tokens)
        save_json(args.json, results)  # a run cut short keeps the levels it finished
    return results


def _decoder(model, prompt, new_tokens: int):
    """A GreedyDecoder on an engine of the cache length generate() used."""
    from greedy_decoder import GreedyDecoder
    from winaconv_runtime.decode_engine import cache_bucket

    return GreedyDecoder(model, cache_bucket(prompt.shape[1] + new_tokens + 1, model.config.max_position_embeddings))


def _step_ms(model, prompt, new_tokens: int) -> float:
    """generate()'s step without the prefill (a sparse MoE prefill runs the per-expert loop: slow and uneven)."""
    return decode_step_ms(_decoder(model, prompt, new_tokens), prompt, steps=new_tokens)


def _profile(model, prompt, new_tokens: int) -> dict | str:
    """Device time of one decode step by kind of kernel (common.profile_step), on an engine of the cache length
    generate() used; a diagnostic, so its failure is reported, not raised."""
    found = _reported(lambda: profile_step(_decoder(model, prompt, new_tokens), prompt))
    if isinstance(found, str):
        return found
    print("profile ms/step:", json.dumps({k: round(v, 3) for k, v in found["ms_per_step"].items()}),
          "kernels/step:", json.dumps(found["kernels_per_step"]), flush=True)
    for name, (ms, count) in list(found["top_kernels_ms_count"].items())[:12]:
        print(f"  {ms:8.4f} ms {count:4d}x {name}", flush=True)
    return found


def _gib(n: int) -> float:
    return n / 2 ** 30


def _release_compiled(model) -> None:
    """Drop transformers' compiled forward, its static cache and graphs before the runtime's own engine runs
    (on an 80 GB card the 61 GB model leaves room for one of them)."""
    import gc

    model.generation_config.compile_config = None
    for name in ("_compiled_call", "_cache"):
        if hasattr(model, name):
            delattr(model, name)
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def kernels(args) -> dict:
    """The grouped launch pair (every tiles candidate) against dense products of the same 8 routed experts
    (gather + batched matmul), each timed in a CUDA graph of 16 calls over 16 different routings (the expert
    tables are 1.2 GB: a call's experts are not in L2 from the last call). The floor: the routed experts' kept
    bytes at the copy bandwidth."""
    from winaconv_runtime.expert_kernels import TILES, ExpertTiles, grouped_experts_triton, launch_down, launch_gate_up

    experts, hidden, width, top_k, calls = 128, 2048, 768, 8, 16
    g = torch.Generator("cuda").manual_seed(0)
    gate_up = torch.randn(experts, 2 * width, hidden, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    down = torch.randn(experts, hidden, width, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    gate_up_t, down_t = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    x = torch.randn(1, hidden, device="cuda", generator=g, dtype=torch.bfloat16)
    routings = [torch.randperm(experts, device="cuda", generator=g)[:top_k][None] for _ in range(calls)]
    weights = torch.rand(1, top_k, device="cuda", generator=g)
    silu = torch.nn.functional.silu
    bandwidth = copy_bandwidth()
    candidates = {"default": TILES, **{name: ExpertTiles(*fields) for name, fields in EXPERT_CANDIDATES.items()
                                       if len(fields) <= len(ExpertTiles._fields)}}  # (an older runtime: fewer)
    if args.candidates:  # the default stays: the table's last column compares it with dense
        chosen = ("default", *args.candidates.split(","))
        candidates = {name: tiles for name, tiles in candidates.items() if name in chosen}

    def dense(index):
        h = torch.bmm(gate_up[index[0]], x[0, :, None].expand(top_k, hidden, 1)).squeeze(-1)
        h = silu(h[:, :width]) * h[:, width:]
        return (torch.bmm(down[index[0]], h[:, :, None]).squeeze(-1) * weights[0, :, None]).sum(0)

    def timed(fn):  # ms per call, over the 16 routings in turn
        return graph_time(lambda i: fn(routings[i]), calls, loop=calls) / 1e3

    results = {"device": torch.cuda.get_device_name(), "versions": versions(), "copy_bandwidth_bytes_per_s": bandwidth,
               "dense_ms": timed(dense), "candidates": {k: list(v) for k, v in candidates.items()},
               "checks": _gpu_checks(x, routings, weights, gate_up, down, gate_up_t, down_t, silu)}
    print("checks on this GPU:", json.dumps(results["checks"]), flush=True)
    results["routing_us"] = _routing_table(x, experts, hidden, top_k)
    expert_bytes = top_k * 3 * hidden * width * 2
    print(f"{results['device']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s; dense gather + bmm "
          f"{results['dense_ms'] * 1e3:.1f} us per call")
    print("| sparsity | floor us | " + " | ".join(f"{k} us" for k in candidates) + " | default over dense |")
    print("|---|---|" + "---|" * len(candidates) + "---|")
    h = torch.cat([_routed_hidden(gate_up[index[0]], x[0], silu) for index in routings]).abs().flatten()
    for sparsity in ([float(v) for v in args.levels.split(",")] if args.levels else (0.0, 0.25, 0.4, 0.5, 0.65, 0.8)):
        # every routed expert drops `sparsity` of its gate/up rows (x's quantile) and of its down rows (the
        # quantile of the routed experts' own activations)
        level = torch.quantile(x.float().abs().flatten(), sparsity).item() if sparsity else -1.0
        level_down = torch.quantile(h[:1 << 20], sparsity).item() if sparsity else -1.0
        tau_gate_up = torch.full((experts, 2, hidden), level, device="cuda")
        tau_down = torch.full((experts, width), level_down, device="cuda")
        down_inputs = [launch_gate_up(x, index[0], gate_up_t, tau_gate_up, top_k) for index in routings]
        row, gate_up_row, down_row = {}, {}, {}
        for name, tiles in candidates.items():
            row[name] = timed(lambda index, tiles=tiles: grouped_experts_triton(
                x, index, weights, gate_up_t, down_t, tau_gate_up, tau_down, silu, tiles))
            # each launch alone, so that the two may take different tiles (DOWN_TILES)
            gate_up_row[name] = timed(lambda index, tiles=tiles: launch_gate_up(
                x, index[0], gate_up_t, tau_gate_up, top_k, tiles))
            down_row[name] = graph_time(lambda i, tiles=tiles: launch_down(
                down_inputs[i], routings[i][0], weights[0], down_t, tau_down, top_k, tiles), calls, loop=calls) / 1e3
        floor = expert_bytes * (1 - sparsity) / bandwidth * 1e3
        results[f"floor_ms_{sparsity:g}"] = floor
        results[f"grouped_ms_{sparsity:g}"] = row
        results[f"gate_up_ms_{sparsity:g}"], results[f"down_ms_{sparsity:g}"] = gate_up_row, down_row
        print(f"| {sparsity:g} | {floor * 1e3:.1f} | " + " | ".join(f"{v * 1e3:.1f}" for v in row.values())
              + f" | {results['dense_ms'] / row['default']:.2f} |", flush=True)
        best_gate_up, best_down = min(gate_up_row, key=gate_up_row.get), min(down_row, key=down_row.get)
        print(f"  alone: gate/up {best_gate_up} {gate_up_row[best_gate_up] * 1e3:.1f} us (default "
              f"{gate_up_row['default'] * 1e3:.1f}), down {best_down} {down_row[best_down] * 1e3:.1f} us (default "
              f"{down_row['default'] * 1e3:.1f})", flush=True)
        save_json(args.json, results)  # a sweep cut short keeps the levels it finished
    return results


def _routed_hidden(gate_up, x, silu) -> torch.Tensor:
    """silu(gate) * up [routed, width] in float32 of the routed experts' gate_up [routed, 2 * width, hidden]."""
    both = torch.einsum("kih,h->ki", gate_up.float(), x.float())
    width = both.shape[1] // 2
    return silu(both[:, :width]) * both[:, width:]


# (experts, hidden channels) per program of the router's product inside the routing launch
ROUTER_BLOCKS = ((16, 256), (8, 256), (32, 128), (64, 64), (16, 512), (32, 256), (128, 32), (16, 2048))


@torch.no_grad()
def _routing_table(x, experts: int, hidden: int, top_k: int) -> dict:
    """One token's routing (router product, softmax, top-k) in µs: the routing launch with each ROUTER_BLOCKS
    geometry, and the router's F.linear followed by the routing-only launch; a CUDA graph cycling over 128 router
    weights (64 MB: not in L2 from the last call)."""
    from winaconv_runtime import expert_routing

    routers = [torch.randn(experts, hidden, device="cuda", dtype=x.dtype) * 0.02 for _ in range(128)]
    table = {"linear + route": graph_time(lambda i: expert_routing.route(
        torch.nn.functional.linear(x, routers[i]), top_k, True), len(routers), loop=len(routers))}
    default = (expert_routing.ROUTER_BLOCK_E, expert_routing.ROUTER_BLOCK_H)
    expected = expert_routing.route(torch.nn.functional.linear(x, routers[0]), top_k, True)[1]
    for block_e, block_h in ROUTER_BLOCKS:
        expert_routing.ROUTER_BLOCK_E, expert_routing.ROUTER_BLOCK_H = block_e, block_h
        name = f"fused e{block_e}h{block_h}" + (" (default)" if (block_e, block_h) == default else "")
        _, _, indices = expert_routing.router_and_route(x, routers[0], top_k, True)
        if not torch.equal(indices, expected):  # another summation order may only break exact ties
            print(f"  {name}: experts differ from F.linear + route on one router", flush=True)
        table[name] = graph_time(lambda i: expert_routing.router_and_route(x, routers[i], top_k, True),
                                 len(routers), loop=len(routers))
    expert_routing.ROUTER_BLOCK_E, expert_routing.ROUTER_BLOCK_H = default
    print("routing one token, us: " + ", ".join(f"{k} {v:.1f}" for k, v in table.items()), flush=True)
    return table


@torch.no_grad()
def _gpu_checks(x, routings, weights, gate_up, down, gate_up_t, down_t, silu) -> dict:
    """The kernels' results on the GPU itself (CI checks them under the interpreter only): the grouped launches
    keeping every channel against a float32 product of the same routed experts (relative max error), and the
    routing kernel's experts against torch's softmax + top-k on random logits (rows whose indices differ)."""
    from winaconv_runtime.expert_kernels import grouped_experts_triton

    device = x.device
    experts, hidden, width = gate_up.shape[0], gate_up.shape[2], down.shape[2]
    keep_all = torch.full((experts, 2, hidden), -1.0, device=device), torch.full((experts, width), -1.0, device=device)
    errors = []
    for index in routings[:4]:
        got = grouped_experts_triton(x, index, weights, gate_up_t, down_t, *keep_all, silu).float()
        h = _routed_hidden(gate_up[index[0]], x[0], silu).to(x.dtype).float()
        want = (torch.einsum("khi,ki->kh", down[index[0]].float(), h) * weights[0, :, None]).sum(0)
        errors.append(float((got[0] - want).abs().max() / want.abs().max()))
    try:
        from winaconv_runtime.expert_routing import route, route_reference
    except ImportError:  # an older runtime (device_ab.sh's A/B)
        return {"grouped_relative_error_keep_all": max(errors), "routing": "not in this runtime"}
    logits = torch.randn(64, experts, device=device, generator=torch.Generator(device).manual_seed(1))
    differing = {}
    for normalize in (True, False):
        scores, indices = route(logits.bfloat16().float(), 8, normalize)
        want_scores, want_indices = route_reference(logits.bfloat16().float(), 8, normalize)
        differing[f"normalize={normalize}"] = {
            "rows_with_other_experts": int((indices != want_indices).any(1).sum()),
            "max_score_error": float((scores.double() - want_scores).abs().max())}
    return {"grouped_relative_error_keep_all": max(errors), "routing": differing,
            "prefill_grouped_against_loop": _reported(lambda: _prefill_check(x, gate_up_t, down_t, silu))}


def _reported(check):
    """A check's result, or its failure as a line (a diagnostic must not cost the timings after it)."""
    try:
        return check()
    except Exception as error:  # noqa: BLE001
        return f"failed: {error!r}"


def _prefill_check(x, gate_up_t, down_t, silu) -> dict | str:
    """The grouped masked prefill (torch's grouped_mm on the runtime's W^T layout) against the per-expert masked
    loop: a 128-token prompt, top-8, thresholds dropping about half of every expert's inputs."""
    import types

    from winaconv_runtime import sparse_experts

    experts, hidden, width = gate_up_t.shape[0], gate_up_t.shape[1], down_t.shape[1]
    g = torch.Generator(x.device).manual_seed(2)
    tokens = torch.randn(128, hidden, device=x.device, generator=g, dtype=x.dtype)
    weights, index = torch.rand(128, experts, device=x.device, generator=g).softmax(-1).topk(8, dim=-1)
    layer = types.SimpleNamespace(gate_up_proj=gate_up_t.transpose(1, 2), down_proj=down_t.transpose(1, 2), act_fn=silu,
                                  winaconv_tau_gate_up=torch.full((experts, 2, hidden), 0.67, device=x.device),
                                  winaconv_tau_down=torch.full((experts, width), 1e-3, device=x.device))
    if not hasattr(sparse_experts, "grouped_products_supported"):
        return "not in this runtime"
    if not sparse_experts.grouped_products_supported(layer, tokens):
        return "grouped_mm not supported here"
    want = sparse_experts.masked_experts(layer, tokens, index, weights).float()  # (also the warm-up calls)
    got = sparse_experts.grouped_masked_experts(layer, tokens, index, weights).float()
    return {"relative_error": float((got - want).abs().max() / want.abs().max()),
            "loop_ms": median_ms(lambda: sparse_experts.masked_experts(layer, tokens, index, weights), 3),
            "grouped_ms": median_ms(lambda: sparse_experts.grouped_masked_experts(layer, tokens, index, weights), 3)}


RULES_MOE = dict(SMOKE_MOE, hidden_size=128, num_experts=16, moe_intermediate_size=96, num_hidden_layers=3,
                 vocab_size=512)


def rules(args) -> dict:
    """Each rule's relative logit error with the routed experts at 50% (WINA scoring; attention and the rest dense)
    and their realised sparsity on held-out tokens, after calibrating on few tokens; experts differ in scale."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
    from models import random_moe as random_test_moe
    from winaconv.convert.calibrate import uniform_levels
    from winaconv.convert.runtime_model import to_runtime_model, winaconv_section
    from winaconv_runtime.architectures import PROJECTIONS
    from winaconv_runtime.modeling_winaconv import sparse_linears

    torch.set_num_threads(1)
    seeds, results = (range(2) if args.smoke else range(args.repeats)), {}
    print("| calibration tokens | rule | relative logit error, experts at 50% (mean over seeds) | experts' sparsity |")
    print("|---|---|---|---|")
    for tokens in ((32,) if args.smoke else (32, 128, 512)):
        for rule in ("shrink", "own", "pooled"):
            errors, kept = [], []
            for seed in seeds:
                base = random_test_moe("qwen3_moe", seed=seed, expert_spread=1.0, **RULES_MOE)
                model, family = to_runtime_model(base, winaconv_section("wina", "none", PROJECTIONS))
                g = torch.Generator().manual_seed(100 + seed)
                calib = torch.randint(3, RULES_MOE["vocab_size"], (1, tokens), generator=g)
                held_out = torch.randint(3, RULES_MOE["vocab_size"], (4, 64), generator=g)
                uniform_levels(model, family, calib, [0.5], norm_scored=PROJECTIONS, expert_rule=rule)
                model.set_sparsity(0)
                dense = model(held_out).logits
                model.set_sparsity(0.5)
                for layer in model.model.layers:  # attention dense: the error is the experts' alone
                    for _, linear in sparse_linears(layer, family):
                        linear.set_thresholds(None, None)
                counts = []
                hooks = [layer.mlp.experts.register_forward_pre_hook(
                    lambda m, a, counts=counts: counts.append(_dropped_share(m, *a[:2])))
                    for layer in model.model.layers]
                sparse = model(held_out).logits
                for hook in hooks:
                    hook.remove()
                errors.append(((sparse - dense).norm() / dense.norm()).item())
                kept.append(statistics.mean(counts))
            key = f"{tokens}_{rule}"
            results[f"error_{key}"], results[f"sparsity_{key}"] = statistics.mean(errors), statistics.mean(kept)
            print(f"| {tokens} | {rule} | {results[f'error_{key}']:.4f} | {results[f'sparsity_{key}']:.3f} |")
    return results


def _dropped_share(experts, x, index) -> float:
    """Share of the gate/up input channels the routed experts drop on these tokens."""
    tau = experts.winaconv_tau_gate_up[index.reshape(-1)]  # [pairs, 2, H]
    rows = x.repeat_interleave(index.shape[1], dim=0).abs().unsqueeze(1)
    return (rows <= tau).float().mean().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("cpu", "gpu", "kernels", "rules"))
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--json")
    parser.add_argument("--levels", help="gpu, kernels: comma-separated levels (default: 0,0.25,0.4,0.5,0.65; "
                        "kernels: 0,0.25,0.4,0.5,0.65,0.8)")
    parser.add_argument("--candidates", help="kernels: only these tiles beside the default (comma-separated names)")
    parser.add_argument("--tiles", choices=sorted(TILE_CHOICES), help="gpu: expert tiles other than the default")
    parser.add_argument("--down-tiles", choices=sorted(TILE_CHOICES),
                        help="gpu: the down launch's own tiles (default: the same as gate/up's)")
    parser.add_argument("--profile-levels", default="", help="gpu: levels whose decode step is profiled by kernel")
    parser.add_argument("--no-baselines", action="store_true", help="gpu: skip transformers' static cache + compile")
    parser.add_argument("--breakdown", action="store_true", help="cpu: the step's time by kind of module")
    args = parser.parse_args()
    if args.mode in ("gpu", "kernels") and not torch.cuda.is_available():
        print(f"{args.mode} needs a GPU", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = {"cpu": cpu, "gpu": gpu, "kernels": kernels, "rules": rules}[args.mode](args)
    results["seconds"] = time.perf_counter() - started
    save_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
