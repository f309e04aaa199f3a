"""Host memory of a conversion: the bound a streamed run should stay under, and the measured peak."""

import resource
from pathlib import Path

import torch

from winaconv_runtime.architectures import projection_sizes

from .calibrate import CalibrationSettings
from .layers import end_names

# What peak_host_bound leaves out besides Python and the libraries: the allocator's caches and thread pools
# (measured in tests/convert/test_memory.py); growth past bound + this is warned about
PROCESS_ALLOWANCE = 128 << 20


def peak_host_bound(model, tokens: int, work_dtype: torch.dtype, settings: CalibrationSettings) -> int:
    """What a streamed conversion should hold at most, in bytes, besides the process's own overhead (Python,
    the libraries' code, the allocator's caches): embeddings + lm_head (float32), three decoder layers in
    float64 (the layer, its transform's float64 copies, the read-ahead basis), the calibration activations
    three times (inputs, outputs, the greedy search's copies), the score samples (per projection, one
    float32 per token and input channel, at most settings.max_scores), and the largest tensor twice more in
    float32 while it is read (a bf16 or quantized copy decoding into the float32 one)."""
    state = model.state_dict()
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    ends = sum(state[n].numel() for n in end_names(model))
    largest = max(t.numel() for t in state.values())
    activations = tokens * model.config.hidden_size * work_dtype.itemsize
    samples = sum(min(settings.max_scores, tokens * inputs) for inputs, _ in projection_sizes(model.config).values()) * 4
    return ends * 4 + 3 * layer_params * 8 + 3 * activations + samples + 2 * largest * 4


def release_freed_layers() -> None:
    """Make glibc return large freed blocks to the system. By default it raises its mmap threshold to the
    largest block freed, after which a layer's tensors come from a heap that keeps their pages once freed:
    a 24-layer stream then held ~200 MB more than one layer needs. A fixed threshold keeps blocks of 1 MiB
    and more mmapped, so a dropped layer leaves the process (no-op off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, the high-water mark of its own address space (ru_maxrss
    would also count the RSS of the process that started this one, which Linux carries over an exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
