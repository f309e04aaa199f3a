"""Registers, spills and resident programs per SM of the runtime's Triton kernels, compiled for a GPU that need
not be here: Triton compiles for a named target with the ptxas it bundles, so this runs on any machine with the
triton wheel (no GPU, no CUDA driver). The device's timings decide; this says, before spending device time, which
configurations spill or leave few programs (and few loads in flight) on each SM.

  python3 benchmarks/kernel_registers.py                 # sm_90 (H100 / H200), the configurations below
  python3 benchmarks/kernel_registers.py --arch 100 --only "expert down"

Arguments are specialised as the JIT specialises them in the runtime's launches: pointers and integer strides
and sizes divisible by 16 (the models' shapes are), batch size and top-k not. Registers depend on the triton
version (the device's is in benchmarks/README.md): install that version to compare with device timings.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU even where the tests interpret

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from winaconv_runtime import expert_kernels, kernels  # noqa: E402

REGISTERS_PER_SM, THREADS_PER_SM, PROGRAMS_PER_SM = 65536, 2048, 32
NOT_DIVISIBLE = {"T", "top_k"}  # batch size and top-k: the JIT does not assume them multiples of 16

# (name, kernel, pointer dtypes, constexprs, num_warps, weight bytes one program reads at full density)
EXPERT_POINTERS = {"x_ptr": "*bf16", "h_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*bf16", "experts_ptr": "*i64",
                   "routing_ptr": "*fp32", "tau_ptr": "*fp32", "ws_ptr": "*fp32", "tickets_ptr": "*i32"}
TILE_POINTERS = {"x_ptr": "*bf16", "w_ptr": "*bf16", "tau_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16",
                 "ws_ptr": "*fp32", "tickets_ptr": "*i32"}


def expert_configs():
    from moe_decode import EXPERT_CANDIDATES

    fields_here = len(expert_kernels.ExpertTiles._fields)  # an older runtime has no `apart`
    for name, fields in {"default": tuple(expert_kernels.TILES), **EXPERT_CANDIDATES}.items():
        if len(fields) > fields_here:
            continue
        tiles = expert_kernels.ExpertTiles(*fields)
        apart = getattr(tiles, "apart", 0)
        shared = {"ITERS": tiles.iters, "BLOCK_K": tiles.block_k, "BLOCK_N": tiles.block_n}
        rows = tiles.iters * tiles.block_k
        yield (f"expert gate/up {name}", expert_kernels._gate_up_kernel, EXPERT_POINTERS,
               {**shared, **({"APART": bool(apart)} if fields_here > 4 else {})}, tiles.num_warps,
               rows * tiles.block_n * (1 if apart else 2) * 2)
        if not apart:
            yield (f"expert down {name}", expert_kernels._down_kernel, EXPERT_POINTERS, shared, tiles.num_warps,
                   rows * tiles.block_n * 2)


def tile_configs():
    """The dense linears' batch-1 tile (one segment, split-K partials), at the runtime's geometry and around it."""
    for block_n, block_k, warps in ((64, 512, 4), (64, 256, 4), (32, 512, 4), (128, 256, 4), (128, 512, 8)):
        constants = {"ends": (4096,), "first_programs": (4096 // block_n,), "N_SEG": 1, "HAS_BIAS": False,
                     "USE_DOT": False, "IEEE": False, "SPLIT": True, "FUSED_REDUCE": False, "EVICT_FIRST": True,
                     "ITERS": 1, "BLOCK_T": 1, "BLOCK_K": block_k, "BLOCK_N": block_n}
        yield (f"linear tile t{block_n}x{block_k}w{warps}", kernels._wina_tile_kernel, TILE_POINTERS, constants,
               warps, block_k * block_n * 2)


def compile_for(kernel, pointers: dict, constants: dict, num_warps: int, arch: int):
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        signature[name] = pointers.get(name, "i32")
        if name not in NOT_DIVISIBLE:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def resource_usage(compiled, arch: int) -> tuple[int, int]:
    """(registers per thread, spill store bytes per thread) from ptxas -v on the kernel's PTX."""
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as handle:
            handle.write(compiled.asm["ptx"])
        report = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", ptx, "-o",
                                 os.path.join(folder, "kernel.cubin")], capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    if registers is None:
        raise RuntimeError(f"ptxas said: {report.strip()[-300:]}")
    return int(registers.group(1)), int(spills.group(1)) if spills else 0


def resident_programs(registers: int, num_warps: int) -> int:
    threads = num_warps * 32
    by_registers = REGISTERS_PER_SM // (max(registers, 1) * threads)
    return min(by_registers, THREADS_PER_SM // threads, PROGRAMS_PER_SM)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default: 90, Hopper)")
    parser.add_argument("--only", default="", help="only the configurations whose name contains this")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}, ptxas {get_ptxas(args.arch).version}\n")
    print("| kernel and configuration | warps | registers | spilled bytes | programs / SM | weight KiB / program "
          "| weight KiB / SM |\n|---|---|---|---|---|---|---|")
    for name, kernel, pointers, constants, warps, weight_bytes in (*expert_configs(), *tile_configs()):
        if args.only not in name:
            continue
        registers, spilled = resource_usage(compile_for(kernel, pointers, constants, warps, args.arch), args.arch)
        resident = resident_programs(registers, warps)
        print(f"| {name} | {warps} | {registers} | {spilled} | {resident} | {weight_bytes / 1024:.0f} "
              f"| {resident * weight_bytes / 1024:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
