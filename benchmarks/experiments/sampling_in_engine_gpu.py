"""Sampling's cost inside model.generate() on the H200 (issue 12): Llama-3-8B config, random bf16 weights,
128-token prompt, 256 new tokens, greedy against sampling (temperature 0.7, top-p 0.9, top-k 50), with the
token choice's vocabulary reductions in two passes (the runtime) and in one (torch's own, as before); then
the kernels of one captured sampling step against one greedy step (torch.profiler over graph replays).

    python benchmarks/experiments/sampling_in_engine_gpu.py > sampling_in_engine_gpu.txt
    python benchmarks/experiments/sampling_in_engine_gpu.py --steps > sampling_steps_gpu.txt

--steps times the captured decode step itself instead (CUDA events over back-to-back graph replays, greedy
and sampling alternated, medians of 5): whole generate() calls vary by 2-3% between repeats, more than
sampling costs.
"""

import statistics
import sys

import torch
from e2e_decode import _ms_per_token, synthetic_runtime
from torch.profiler import ProfilerActivity, profile

from common import random_llama3_8b
from winaconv_runtime import generation

TWO_PASS = (generation.vocab_argmax, generation.vocab_count)
ONE_PASS = (lambda scores: scores.argmax(dim=-1), lambda flags: flags.sum(dim=-1, keepdim=True))
SAMPLING = dict(do_sample=True, temperature=0.7, top_p=0.9)


def use(reductions, model):
    generation.vocab_argmax, generation.vocab_count = reductions
    for engine in model.__dict__.get("_winaconv_engines", {}).values():  # capture again with these ops
        engine._graphs.clear()
        engine._warm.clear()


def profile_steps(model, prompt, options, steps=8):
    """Kernel times of `steps` graph replays continuing a generate() call."""
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                   pad_token_id=0, **options)
    engine = next(reversed(model._winaconv_engines.values()))
    engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" and event.self_device_time_total > 0:
            rows.append((event.self_device_time_total / steps, event.count // steps, event.key[:90]))
    rows.sort(reverse=True)
    print(f"  total {sum(r[0] for r in rows):.1f} us per step in {sum(r[1] for r in rows)} kernels")
    for us, count, name in rows[:25]:
        print(f"  {us:8.1f} us {count:4d}x  {name}")


def step_ms(model, prompt, options, replays=64):
    """ms of one captured decode step: back-to-back replays continuing a generate() call, CUDA events."""
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                   pad_token_id=0, **options)
    engine = next(reversed(model._winaconv_engines.values()))
    position = int(engine.position)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        engine.step()
    end.record()
    torch.cuda.synchronize()
    engine.position.fill_(position)  # the next timing reuses the same cache slots
    return start.elapsed_time(end) / replays


def steps(model, prompts):
    print("step ms (median of 5 x 64 replays): level, batch, greedy, sampling, sampling over greedy", flush=True)
    for level in (0.0, 0.25, 0.4, 0.5, 0.65):
        model.set_sparsity(level)
        for b in (1, 4):
            times = {"greedy": [], "sampling": []}
            for _ in range(5):
                times["greedy"].append(step_ms(model, prompts[b], dict(do_sample=False)))
                times["sampling"].append(step_ms(model, prompts[b], SAMPLING))
            greedy, sample = (statistics.median(times[m]) for m in ("greedy", "sampling"))
            print(f"level {level:g} b{b}: greedy {greedy:.3f} sampling {sample:.3f} ms "
                  f"(+{(sample / greedy - 1) * 100:.1f}%, +{(sample - greedy) * 1000:.0f} us)", flush=True)


def main():
    torch.manual_seed(0)
    base = random_llama3_8b("cuda")
    prompts = {b: torch.randint(100, 40000, (b, 128), device="cuda") for b in (1, 4)}
    model = synthetic_runtime(base, "none", prompts[1], [0.25, 0.4, 0.5, 0.65])
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if "--steps" in sys.argv:
        steps(model, prompts)
        return

    def ms(prompt, **options):
        return _ms_per_token(lambda n: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                                      min_new_tokens=n, pad_token_id=0, **options), 256)[0]

    for b in (1, 4):
        for level in (0.0, 0.5):
            model.set_sparsity(level)
            for label, reductions in (("two-pass", TWO_PASS), ("one-pass", ONE_PASS)):
                use(reductions, model)
                greedy = ms(prompts[b], do_sample=False)
                torch.manual_seed(0)
                sample = ms(prompts[b], **SAMPLING)
                print(f"b{b} level {level:g} {label}: greedy {greedy:.3f} sampling {sample:.3f} ms/token "
                      f"(+{(sample / greedy - 1) * 100:.1f}%, +{(sample - greedy) * 1000:.0f} us)", flush=True)
    model.set_sparsity(0.0)
    for label, reductions in (("two-pass", TWO_PASS), ("one-pass", ONE_PASS)):
        use(reductions, model)
        for mode, options in (("greedy", dict(do_sample=False)), ("sampling", SAMPLING)):
            print(f"b4 level 0 {label} {mode}: kernels per step", flush=True)
            profile_steps(model, prompts[4], options)


if __name__ == "__main__":
    main()
