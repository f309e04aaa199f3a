"""Tensor-parallel decode speed: Llama-3-70B's config (and Llama-3-8B's) with random bf16 weights at TP = the number
of ranks, batch-1 `model.generate()` through the runtime at each level, next to transformers' own tensor-parallel
static cache + compile on the base model, and the per-GPU weight-read floor.

One device call on two H200s (kind nvidia-h200-x2; repo root, `runtime/` linked as `winaconv_runtime`):
  python -m torch.distributed.run --nproc-per-node 2 benchmarks/tp_decode.py --out $OUT/tp_decode.json
CPU smoke run (a tiny config, gloo, float32, seconds; tests/runtime/test_tensor_parallel.py runs it so it cannot rot):
  python -m torch.distributed.run --nproc-per-node 2 benchmarks/tp_decode.py --smoke --out /tmp/tp_smoke.json

No 141 GB checkpoint is written: each rank writes a folder holding only config.json and an empty weight file, and
`from_pretrained(..., tp_plan="auto")` builds the model sharded, giving every weight it does not find transformers'
own random initialisation, on each rank for its shard only. The runtime model comes through transformers' loader
below the runtime's own (which refuses missing tensors, as it should for a real checkpoint). Its levels are synthetic
as in common.synthetic_runtime: every projection at the level's sparsity, thresholds taken from the
prompt's own activations (TEAL scoring; the keep rule costs the same with column norms), rank 0's table on every
rank. Times are ms per new token, (generate(N + 1) - generate(1)) / N, medians of 3 (common.ms_per_token), all
ranks decoding together; rank 0 writes the results after every stage, so a run cut short still reports.
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from common import LLAMA3_70B, LLAMA3_8B, SMOKE_LLAMA, copy_bandwidth, hf_generate, ms_per_token, profile_step, versions

LEVELS = (0.0, 0.5, 0.25, 0.4, 0.65)  # 0 and 0.5 first: the ratios, should a run be cut short
MODELS = {"llama3-70b": LLAMA3_70B, "llama3-8b": LLAMA3_8B}
SMOKE = dict(SMOKE_LLAMA, vocab_size=128)


def weightless_folder(shape: dict, root: Path) -> Path:
    """config.json of a runtime (TEAL, no transform) Llama of these shapes, and a weight file with no tensors."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from winaconv.convert.runtime_model import runtime_config, winaconv_section

    _, config, _ = runtime_config(LlamaConfig(**shape), winaconv_section("teal", "none", ()))
    folder = root / f"rank{os.environ.get('RANK', 0)}"  # one folder per rank: no rank waits for another's
    config.save_pretrained(folder)
    save_file({}, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def load_sharded(folder: Path, runtime: bool, dtype):
    """The model of `folder` with random weights, sharded by transformers' tp_plan="auto"."""
    from transformers import LlamaForCausalLM

    from winaconv_runtime.modeling_winaconv import WinaconvMixin, WinaLlamaForCausalLM

    torch.manual_seed(0)  # DTensor's random initialisation wants one seed on every rank
    # the runtime class through transformers' own loader (see the docstring); the base model as it is
    loader = super(WinaconvMixin, WinaLlamaForCausalLM).from_pretrained if runtime else LlamaForCausalLM.from_pretrained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tp_plan's deprecation, the missing tensors it is meant to initialise
        return loader(folder, tp_plan="auto", dtype=dtype).eval()


@torch.no_grad()
def synthetic_levels(model, prompt, levels) -> None:
    """Store and allow `levels`: every projection at the level's sparsity of |x| over the prompt, rank 0's table."""
    from winaconv.convert.statistics import quantile_grid, threshold_at
    from winaconv_runtime.architectures import PROJECTIONS
    from winaconv_runtime.checkpoint_format import SparsitySettings, store_level
    from winaconv_runtime.modeling_winaconv import sparse_linears

    grids, handles = {}, []
    for index, layer in enumerate(model.model.layers):
        for projections, linear in sparse_linears(layer, model.winaconv_family):
            def record(module, args, index=index, projections=projections):
                grid = quantile_grid(args[0].float().abs()).cpu()  # a row-wise shard sees its own channels
                grids.update({(index, p): grid for p in projections})

            handles.append(linear.register_forward_pre_hook(record))
    try:
        model(prompt)
    finally:
        for handle in handles:
            handle.remove()
    rows = range(len(model.model.layers))
    tables = [{level: [[threshold_at(grids[i, p], level) for p in PROJECTIONS] for i in rows] for level in levels}]
    dist.broadcast_object_list(tables, src=0)
    for level, table in tables[0].items():
        store_level(model.config.winaconv, level, table, [[level] * len(PROJECTIONS) for _ in rows])
    model.sparsity_settings = SparsitySettings.from_config(model.config)


def read_floor_ms(model, bandwidth: float, level: float) -> float:
    """This rank's bytes per token at `level` (projections read at 1 - level, the rest whole; embeddings are
    looked up, not read) over the copy bandwidth."""
    from winaconv_runtime.sparse_linear import SparseLinear
    from winaconv_runtime.tensor_parallel import local

    projection = {id(m.weight) for m in model.modules() if isinstance(m, SparseLinear)}
    total = 0.0
    for name, param in model.named_parameters():
        if "embed_tokens" not in name:
            size = local(param).numel() * param.element_size()
            total += size * (1 - level) if id(param) in projection else size
    return total / bandwidth * 1000


def ours(model, prompt):
    """n -> the runtime's greedy generate() of exactly n new tokens (its engine: compiled step, CUDA graph)."""
    return lambda n: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=0)


def measure(name: str, shape: dict, args, results: dict, save) -> None:
    from transformers import GenerationMixin

    from greedy_decoder import GreedyDecoder

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    record = results.setdefault(name, {"config": {k: shape[k] for k in ("hidden_size", "intermediate_size",
                                                                        "num_hidden_layers", "vocab_size")}})
    with tempfile.TemporaryDirectory() as root:
        folder = weightless_folder(shape, Path(root))
        torch.manual_seed(0)
        prompt = torch.randint(100, shape["vocab_size"] - 1, (1, args.prompt_tokens))
        if args.baseline:
            base = load_sharded(folder, runtime=False, dtype=dtype)
            try:
                record["transformers_tp_static_compile_ms"] = ms_per_token(
                    hf_generate(base, prompt.to(base.device), cache_implementation="static"), args.new_tokens)[0]
            except Exception as error:  # noqa: BLE001  (the runtime's timings still come)
                record["transformers_tp_static_compile_ms"] = f"failed: {type(error).__name__}: {str(error)[:300]}"
            save()
            del base
            _release()
        model = load_sharded(folder, runtime=True, dtype=dtype)
    prompt = prompt.to(model.device)
    synthetic_levels(model, prompt, [level for level in args.levels if level > 0])
    if on_gpu:
        if "copy_bandwidth_TBps" not in results:
            results["copy_bandwidth_TBps"] = copy_bandwidth() / 1e12
        bandwidth = results["copy_bandwidth_TBps"] * 1e12
        record["weight_read_floor_ms"] = {f"{x:g}": read_floor_ms(model, bandwidth, x) for x in args.levels}
    record["generate_ms"], record["engine"] = {}, {}
    for level in args.levels:
        model.set_sparsity(level)
        key = f"{level:g}"
        try:
            record["generate_ms"][key] = ms_per_token(ours(model, prompt), args.new_tokens)[0]
            record["engine"][key] = "generate()"
        except Exception as error:  # noqa: BLE001  (the eager step captured as a CUDA graph still says the speed)
            record["engine"][key] = f"generate() failed ({type(error).__name__}: {str(error)[:300]}); GreedyDecoder without compile"
            decoder = GreedyDecoder(model, args.prompt_tokens + args.new_tokens + 8, compile=False)
            record["generate_ms"][key] = ms_per_token(lambda n: decoder.generate(prompt, n), args.new_tokens)[0]
        if dist.get_rank() == 0:
            print(f"{name} {key}: {record['generate_ms'][key]:.3f} ms/token ({record['engine'][key][:40]})", flush=True)
        save()
    _ratios(record)
    model.set_sparsity(0.5 if 0.5 in args.levels else args.levels[-1])
    reference = GenerationMixin.generate(model, prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                         min_new_tokens=32, do_sample=False, pad_token_id=0)
    mine = ours(model, prompt)(32)
    same = (mine[0, prompt.shape[1]:] == reference[0, prompt.shape[1]:]).long().cumprod(0).sum().item()
    record["generate_first_tokens_equal_to_transformers_loop"] = f"{same} of 32 at level {model.sparsity:g}"
    if on_gpu:
        for level in args.profile_levels:  # where a step's time goes: collectives, sparse products, the rest
            model.set_sparsity(level)
            try:
                decoder = GreedyDecoder(model, args.prompt_tokens + 16)
                record.setdefault("profile", {})[f"{level:g}"] = profile_step(decoder, prompt)
            except Exception as error:  # noqa: BLE001  (a diagnostic: its failure must not cost the timings)
                record.setdefault("profile", {})[f"{level:g}"] = f"failed: {error!r}"
    save()
    del model
    _release()


def _ratios(record: dict) -> None:
    times = record["generate_ms"]
    if "0" in times and "0.5" in times:
        record["speedup_50_over_level_0"] = times["0"] / times["0.5"]
    if "0" in times and isinstance(record.get("transformers_tp_static_compile_ms"), float):
        record["speedup_level_0_over_transformers"] = record["transformers_tp_static_compile_ms"] / times["0"]


def _release() -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs hold the old model's weights
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "tp_decode.json")
    parser.add_argument("--models", default=",".join(MODELS), help=f"of {', '.join(MODELS)}, in this order")
    parser.add_argument("--levels", default=",".join(f"{x:g}" for x in LEVELS))
    parser.add_argument("--profile-levels", default="0,0.5")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="a tiny config on the CPU (gloo): checks the script runs")
    args = parser.parse_args()
    args.levels = [float(x) for x in args.levels.split(",")]
    args.profile_levels = [float(x) for x in args.profile_levels.split(",") if x]
    if args.smoke:
        models = {"smoke": SMOKE}
        args.prompt_tokens, args.new_tokens = 8, 4
    else:
        models = {name: MODELS[name] for name in args.models.split(",")}
    from transformers.utils import logging

    logging.set_verbosity_error()  # every rank would list the tensors it initialises
    torch._dynamo.config.recompile_limit = 64  # one compiled step per model and level; never fall back to eager
    torch._dynamo.config.cache_size_limit = 64
    results = {"command": " ".join(sys.argv), "versions": versions(), "tp": int(os.environ.get("WORLD_SIZE", 1)),
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "batch": 1}
    started = time.perf_counter()

    def save():
        if dist.is_initialized() and dist.get_rank() == 0:
            results["seconds"] = time.perf_counter() - started
            args.out.write_text(json.dumps(results, indent=1))

    for name, shape in models.items():
        measure(name, shape, args, results, save)
    if dist.get_rank() == 0:
        print(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
