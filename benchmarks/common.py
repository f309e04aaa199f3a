"""What the benchmark scripts share: timing, the machine's versions and bandwidth, and the random
Llama-3-8B they measure on. The scripts run as `python benchmarks/NAME.py`, which puts this folder on
sys.path; winaconv and winaconv_runtime are imported as installed (`pip install -e .`)."""

import statistics
import sys
import time

import torch

# Llama-3-8B's shapes (the design targets' reference model); weights are random
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
)

# Llama-3-70B's shapes (tensor-parallel runs: 141 GB in bf16, more than one GPU holds)
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)


def random_llama3_8b(device: str = "cuda", norms: tuple[float, float] | None = None):
    """The Llama-3-8B config with random bf16 weights, built on `device`; norms=(low, high) draws the norm
    weights uniformly (non-trivial norms make folding them real work)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B, dtype="bfloat16")).to(torch.bfloat16)
    if norms is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(*norms)
    return model.eval()


def median_ms(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, in ms (CPU; GPU scripts time with events or graphs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def versions() -> dict:
    import transformers

    found = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
             "threads": torch.get_num_threads()}
    try:
        import triton

        found["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        found["gpu"] = torch.cuda.get_device_name()
        found["cuda"] = torch.version.cuda
    return found


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes per second (read + written), over 2 GiB, on the GPU."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1000)


def capture_graph(fn, *args, warmups: int = 1):
    """(CUDA graph of fn(*args), its output): warmed on a side stream first, as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    return graph, out
