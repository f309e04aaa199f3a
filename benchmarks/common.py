"""What the benchmark scripts share: timing, the machine's versions and bandwidth, the random Llama models they
measure on, a runtime model with synthetic levels, and a profile of one decode step. The scripts run as
`python benchmarks/NAME.py`, which puts this folder on sys.path; winaconv and winaconv_runtime are imported as
installed (`pip install -e .`). Each script's `--smoke` runs it on SMOKE_LLAMA on the CPU in seconds
(tests/test_benchmarks.py)."""

import contextlib
import json
import os
import statistics
import sys
import time
import types

import torch

# Llama-3-8B's shapes (the design targets' reference model); weights are random
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
)

# Llama-3-70B's shapes (tensor-parallel runs: 141 GB in bf16, more than one GPU holds)
LLAMA3_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)

# a ~1B Llama-architecture model (the CPU decode and conversion-memory runs; SmolLM2's 49,152-token vocabulary)
RANDOM_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=False)

# the smoke runs' model: every script's code path in seconds on the CPU (the vocabulary fits the assets' tokenizer)
SMOKE_LLAMA = dict(LLAMA3_8B, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules in `dtype` (transformers' constructors ignore config.dtype: a 30B model would first be
    built in float32, twice its bf16 bytes)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_llama(shape: dict = LLAMA3_8B, device: str = "cuda", norms: tuple[float, float] | None = None,
                 dtype: torch.dtype = torch.bfloat16):
    """A Llama of these shapes with random weights, built on `device`; norms=(low, high) draws the norm
    weights uniformly (non-trivial norms make folding them real work)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(LlamaConfig(**shape, dtype=dtype)).to(dtype)
    if norms is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.uniform_(*norms)
    return model.eval()


def median_ms(fn, repeats: int) -> float:
    """Median wall time of fn() over `repeats` calls, in ms, the device synchronized around each call (kernels
    alone: GPU scripts time them with events or graphs)."""
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
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


def graph_time(make_call, n_copies, loop=24, replays=15):
    """Median time of one call in us: a CUDA graph of `loop` calls make_call(0), make_call(1), ... cycling over
    n_copies (weight copies or routings, so a call's bytes are not in L2 from the last one), replayed `replays` times."""
    g, _ = capture_graph(lambda: [make_call(i % n_copies) for i in range(loop)])
    g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(replays):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / loop)
    ts.sort()
    del g
    return ts[len(ts) // 2]


def save_json(path, results: dict) -> None:
    """Write `results` to `path` when a path was given (scripts call it after each step: a run cut short keeps
    what it finished)."""
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=1)


PEERS_TEAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".peers", "teal")


def load_teal_kernels():
    """TEAL's public kernel module (.peers/teal/sparse_gemv.py, fetched at benchmark time, never committed), or
    None. Its torch.compile wrapper classes import TEAL's compile_wrapper (and msgspec); the benchmarks call its
    functions only, so where that module is absent an empty stand-in lets the file import."""
    if not os.path.exists(os.path.join(PEERS_TEAL, "sparse_gemv.py")):
        return None
    if PEERS_TEAL not in sys.path:
        sys.path.insert(0, PEERS_TEAL)
    try:
        import compile_wrapper  # noqa: F401
    except ImportError:
        sys.modules["compile_wrapper"] = types.SimpleNamespace(BaseKernel=object)
    import sparse_gemv

    return sparse_gemv


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ms_per_token(generate, new_tokens: int, repeats: int = 3, warm_tokens: int | None = None):
    """(time of generate(N + 1) - time of generate(1)) / N in ms, medians of `repeats`, after one
    warm-up call (compile, capture); also returns what the last full call returned."""
    def run(n):
        synchronize()
        start = time.perf_counter()
        result = generate(n)
        synchronize()
        return time.perf_counter() - start, result

    run(new_tokens + 1 if warm_tokens is None else warm_tokens)
    fulls = [run(new_tokens + 1) for _ in range(repeats)]
    prefill = statistics.median(run(1)[0] for _ in range(repeats))
    return (statistics.median(t for t, _ in fulls) - prefill) / new_tokens * 1000, fulls[-1][1]


def hf_generate(model, prompt, **options):
    """n -> transformers' greedy generate of exactly n new tokens."""
    return lambda n: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                    min_new_tokens=n, do_sample=False, pad_token_id=0, **options)


def synthetic_runtime(base, transform: str, prompt, levels):
    """A runtime model sharing base's weights, every projection at the level's sparsity (uniform
    allocation from the prompt's own activations, TEAL scoring): speed runs without a conversion. The
    exact transform's shortcut matrices are identities here, which costs the same bytes."""
    from winaconv.convert.calibrate import uniform_levels
    from winaconv.convert.runtime_model import to_runtime_model, winaconv_section

    model, family = to_runtime_model(base, winaconv_section("teal", transform, ()))
    model.to(base.dtype)  # the exact transform's shortcut matrices start as float32 identities
    uniform_levels(model, family, prompt, [x for x in levels if x > 0])
    return model


KERNEL_KINDS = (("collectives", ("nccl", "allreduce", "all_reduce", "allgather", "all_gather")),  # tensor parallel
                ("winaconv sparse", ("_wina_", "_split_reduce_kernel", "embedding_bag")),  # GPU kernels, CPU gather
                ("dense matmul", ("gemv", "gemm", "cutlass", "nvjet", "sm90_", "cublas", "splitkreduce", "aten::mm",
                                  "aten::addmm", "aten::linear")),
                ("attention", ("flash", "fmha", "attention", "sdpa")),
                ("moe routing", ("_route_kernel", "topk", "sort", "softmax")))


def decode_step_ms(decoder, prompt, steps: int, repeats: int = 3) -> float:
    """Wall ms per decode step of the decoder's engine (its CUDA graph where it uses one), the prefill left out:
    a prompt whose prefill is slow and uneven makes generate(N + 1) - generate(1) noisy. Median of `repeats`."""
    engine = decoder.engine
    decoder.generate(prompt, 4)  # compile, warm and capture the step
    times = []
    for _ in range(repeats):
        decoder.generate(prompt, 1)  # prefill; the timed steps continue this sequence
        synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize()
        times.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(times)


def profile_step(decoder, prompt, steps: int = 4) -> dict:
    """Device time per decode step by kind of kernel: the decoder's step replayed without its CUDA graph (the
    compiled step where it is compiled), so every kernel stays visible. On the CPU: aten ops' own CPU time."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.cuda.is_available() and prompt.is_cuda
    engine = decoder.engine
    decoder.generate(prompt, 1)  # prefill; the profiled steps continue this sequence
    graphed, engine.use_graph = engine.use_graph, False
    try:
        engine.step()
        synchronize()
        with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine.step()
            synchronize()
    finally:
        engine.use_graph = graphed
    totals, counts, kernels = {}, {}, {}
    for event in prof.key_averages():
        own_us = event.self_device_time_total if on_gpu else event.self_cpu_time_total
        if (on_gpu and event.device_type.name != "CUDA") or own_us <= 0:
            continue
        name = event.key.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(x in name for x in keys)), "other")
        ms = own_us / steps / 1000
        totals[kind] = totals.get(kind, 0.0) + ms
        counts[kind] = counts.get(kind, 0) + event.count // steps
        kernels[event.key[:90]] = (round(ms, 4), event.count // steps)
    top = dict(sorted(kernels.items(), key=lambda item: -item[1][0])[:25])
    return {"ms_per_step": totals, "kernels_per_step": counts, "top_kernels_ms_count": top}
