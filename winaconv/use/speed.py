"""Decoding through model.generate() from the command line: a streamed completion (`winaconv generate`)
and decode ms/token at each stored level next to transformers' own dense loop (`winaconv bench`).
torch, transformers and the runtime load only when a command runs, so --help stays fast."""

import json
import time
import warnings
from pathlib import Path

from ..errors import WinaconvError
from ..sources import resolve_device


def _find(model: str, trust_checkpoint_code: bool):
    from .loading import find_model

    return find_model(model, trust_checkpoint_code)


def _load(ref, device: str, dtype: str):
    from .loading import load_model, load_tokenizer, resolve_dtype

    return load_model(ref, device, resolve_dtype(dtype, device)), load_tokenizer(ref)


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature > 0:
        raise WinaconvError(f"--temperature must be above 0; got {temperature:g} (greedy decoding is what you get "
                            "without --sample)")
    if not 0 < top_p <= 1:
        raise WinaconvError(f"--top-p must lie in (0, 1]; got {top_p:g}")


def check_context(ref, prompt_tokens: int, new_tokens: int, prompt_option: str = "the prompt") -> None:
    """The prompt and the tokens to generate fit the model's context (max_position_embeddings)."""
    if ref.context is None:
        return
    if prompt_tokens > ref.context:
        raise WinaconvError(f"{prompt_option} has {prompt_tokens} tokens, more than the model's context of {ref.context}")
    if prompt_tokens + new_tokens > ref.context:
        raise WinaconvError(f"{prompt_option} ({prompt_tokens} tokens) and {new_tokens} new tokens exceed the model's "
                            f"context of {ref.context} positions")


def timed_streamer(tokenizer, **kwargs):
    """A TextStreamer that notes when each group of new tokens arrives (`arrivals`: (time, new tokens so far)),
    so that the decode is timed apart from the prompt and the one-time start-up (compiling, capturing, measuring
    the CPU gather) that the first steps pay."""
    from transformers import TextStreamer

    class TimedStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, **kwargs)
            self.arrivals: list[tuple[float, int]] = []
            self.prompt_seen = False

        def put(self, value):
            super().put(value)
            if not self.prompt_seen:  # generate() puts the prompt first
                self.prompt_seen = True
                return
            self.arrivals.append((time.perf_counter(), (self.arrivals[-1][1] if self.arrivals else 0) + value.numel()))

    return TimedStreamer()


def speed_line(arrivals: list[tuple[float, int]], start: float, end: float) -> str:
    """Decode ms/token from the arrivals after the first group (which carries the start-up), or a plain
    statement that there were too few tokens to tell the decode apart."""
    total = arrivals[-1][1] if arrivals else 0
    if len(arrivals) < 2:
        seconds = end - start
        return (f"{total} tokens in {seconds:.2f} s: {1000 * seconds / max(total, 1):.1f} ms/token, "
                f"{total / seconds:.1f} tokens/s with the prompt and start-up included (too few tokens to time the "
                "decode alone; winaconv bench measures it)")
    first_time, first_tokens = arrivals[0]
    per_token = (arrivals[-1][0] - first_time) / (total - first_tokens)
    return (f"{total} tokens, {1000 * per_token:.1f} ms/token decode, {1 / per_token:.1f} tokens/s (the last "
            f"{total - first_tokens}; the first {first_tokens} took {1000 * (first_time - start):.0f} ms with the "
            "prompt and start-up)")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(model, prompt, sparsity, max_new_tokens, sample, temperature, top_p, chat, device, dtype,
                 trust_checkpoint_code=False, say=print):
    from .loading import parse_levels

    if not prompt:
        raise WinaconvError("the prompt is empty")
    check_sampling(temperature, top_p)
    device = resolve_device(device)
    ref = _find(model, trust_checkpoint_code)
    if sparsity is not None:
        parse_levels((sparsity,), ref)
    loaded, tokenizer = _load(ref, device, dtype)
    level = sparsity if sparsity is not None else (loaded.settings.default_sparsity if loaded.settings else 0.0)
    loaded.set_sparsity(level)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise WinaconvError(f"{ref.name} has no chat template; drop --chat")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    if encoded.input_ids.shape[1] == 0:
        raise WinaconvError("the prompt encodes to no tokens")
    check_context(ref, encoded.input_ids.shape[1], max_new_tokens)
    options = dict(max_new_tokens=max_new_tokens, do_sample=sample)
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    streamer = timed_streamer(tokenizer, skip_prompt=chat, skip_special_tokens=True)
    start = time.perf_counter()
    out = loaded.model.generate(encoded.input_ids, attention_mask=encoded.attention_mask, streamer=streamer, **options)
    _sync(device)
    say(f"{speed_line(streamer.arrivals, start, time.perf_counter())}; sparsity {level:g}, {device}")
    return out


def _timed_generate(generate, ids, new_tokens, device) -> float:
    import torch

    _sync(device)
    start = time.perf_counter()
    generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
             do_sample=False)
    _sync(device)
    return time.perf_counter() - start


def decode_ms_per_token(generate, ids, new_tokens, device, repeats: int = 2) -> float:
    """(time for new_tokens - time for 1 token) / (new_tokens - 1): the prefill cancels out."""
    _timed_generate(generate, ids, new_tokens, device)  # warm-up (compile, graph capture)
    full = min(_timed_generate(generate, ids, new_tokens, device) for _ in range(repeats))
    first = min(_timed_generate(generate, ids, 1, device) for _ in range(repeats))
    return 1000 * (full - first) / max(new_tokens - 1, 1)


def run_bench(model, levels, new_tokens, prompt_tokens, batch, device, dtype, save, trust_checkpoint_code=False):
    import torch
    from transformers import GenerationMixin

    from .loading import parse_levels

    device = resolve_device(device)
    if new_tokens < 2:
        raise WinaconvError("--new-tokens must be at least 2")
    ref = _find(model, trust_checkpoint_code)
    levels = parse_levels(levels, ref) if levels else ref.available()
    check_context(ref, prompt_tokens, new_tokens, "--prompt-tokens")
    save_to = results_file(ref) if save else None  # refused now, not after the timing
    loaded, _ = _load(ref, device, dtype)
    vocab = loaded.model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    loaded.set_sparsity(0.0)

    def transformers_dense(*args, **kwargs):
        if device.startswith("cuda"):
            kwargs["cache_implementation"] = "static"  # transformers compiles its step with a static cache
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return GenerationMixin.generate(loaded.model, *args, **kwargs)

    baseline = decode_ms_per_token(transformers_dense, ids, new_tokens, device)
    speeds = {}
    for level in levels:
        loaded.set_sparsity(level)
        speeds[level] = decode_ms_per_token(loaded.model.generate, ids, new_tokens, device)
    return dict(model=ref.name, device=torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                dtype=str(next(loaded.model.parameters()).dtype).replace("torch.", ""), batch=batch,
                prompt_tokens=prompt_tokens, new_tokens=new_tokens, transformers_dense_ms=baseline,
                speed={f"{k:g}": v for k, v in speeds.items()},
                save_to=str(save_to) if save else None)


def results_file(ref) -> Path:
    """Where --save writes: the results file of a local winaconv checkpoint folder, whose current content (if
    any) must be a JSON object; a plain model folder, a Hub id or a symbolic link is refused."""
    from ..checkpoint.model_card import RESULTS_FILE, read_json

    from ..checkpoint.folder import checkpoint_file

    folder = Path(ref.name).expanduser()
    if ref.section is None or not folder.is_dir():
        raise WinaconvError(f"--save writes {RESULTS_FILE} into a local winaconv checkpoint folder; {ref.name} is not one")
    path = checkpoint_file(folder, RESULTS_FILE)
    if path.exists():
        read_json(path, "results file")
    return path


def save_speed(report: dict) -> None:
    from ..checkpoint.folder import write_into_checkpoint
    from ..checkpoint.model_card import read_json

    path = Path(report["save_to"])
    results = read_json(path, "results file") if path.exists() else {}
    results["speed"] = {k: round(v, 3) for k, v in report["speed"].items()}
    results["speed_note"] = (f"{report['device']}, {report['dtype']}, batch {report['batch']}, "
                             f"{report['prompt_tokens']}-token prompt, model.generate() (winaconv bench)")
    write_into_checkpoint(path.parent, path.name, json.dumps(results, indent=2) + "\n")
