"""Where the sampling step's time goes on the GPU (issue 12: sampling at batch 4 costs 0.35-0.46 ms per token
over greedy end to end). Times the token choice alone, captured in a CUDA graph as the decode engine runs
it, on Llama-3's vocabulary, for greedy, the runtime's sampling and variants that each remove or replace one
part of it; then lists the kernels of one sampling step (torch.profiler).

    python benchmarks/experiments/token_choice_gpu.py > token_choice_gpu.txt
"""

import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from winaconv_runtime.generation import KNOB_ROWS, LogitsPlan, choose_tokens, process_logits, top_k_candidates

VOCAB = 128256
PLAN = LogitsPlan(repetition_penalty=False, min_new_tokens=False, do_sample=True, temperature=True, top_k=50, top_p=True)
GREEDY = PLAN._replace(do_sample=False, temperature=False, top_k=0, top_p=False)


def knobs(device):
    values = torch.zeros(len(KNOB_ROWS), dtype=torch.float64, device=device)
    values[0], values[1] = 0.7, 0.1
    return values


def graph_ms(fn, replays: int = 200, repeats: int = 7) -> float:
    """Median per-replay time of fn captured in a CUDA graph, in ms."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    return statistics.median(times)


def main():
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__)
    for batch in (1, 4):
        torch.manual_seed(0)
        # bf16-rounded logits, as a bf16 model's lm_head gives them: ties are common
        logits = (torch.randn(batch, VOCAB, device=device) * 3).bfloat16().float()
        seen = torch.zeros(batch, VOCAB, dtype=torch.bool, device=device)
        generated = torch.zeros(1, dtype=torch.long, device=device)
        k = knobs(device)
        out = torch.zeros(batch, dtype=torch.long, device=device)

        def run(plan):
            def fn():
                scores = process_logits(logits, seen, generated, plan, k, None)
                out.copy_(choose_tokens(scores, plan, k))
            return fn

        def candidates_only():
            scores = process_logits(logits, seen, generated, PLAN, k, None)
            out.copy_(top_k_candidates(scores, PLAN, k).index[:, 0])

        def topk_only():
            out.copy_(torch.topk(logits, 50, dim=-1).indices[:, 0])

        def topk_two_stage():  # 128256 = 501 x 256: top-50 of each 256, then of the 501 x 50
            values, index = torch.topk(logits.view(batch, -1, 256), 50, dim=-1)
            best = torch.topk(values.reshape(batch, -1), 50, dim=-1).indices
            out.copy_(index.reshape(batch, -1).gather(1, best)[:, 0])

        def tie_noise_only():
            tied = logits == logits[:, :1]
            noise = torch.rand(tied.shape, device=device)
            out.copy_(noise.masked_fill(~tied, -1).argmax(dim=-1))

        def scale_only():
            out.copy_((logits / k[0]).argmax(dim=-1))

        rows = {
            "greedy argmax": run(GREEDY),
            "sampling (runtime: top-k 50, top-p 0.9, T 0.7)": run(PLAN),
            "  candidates without the race": candidates_only,
            "  torch.topk(50) alone": topk_only,
            "  two-stage topk (256-chunks) alone": topk_two_stage,
            "  tie-group noise alone": tie_noise_only,
            "  temperature divide alone": scale_only,
        }
        for name, fn in rows.items():
            print(f"batch {batch}  {name:52s} {graph_ms(fn) * 1e3:8.1f} us", flush=True)
        fn = run(PLAN)
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70), flush=True)


if __name__ == "__main__":
    main()
