"""Decoding through model.generate() from the command line: a streamed completion (`winaconv generate`)
and decode ms/token at each stored level next to transformers' own dense loop (`winaconv bench`).
torch, transformers and the runtime load only when a command runs, so --help stays fast."""

import json
import time
import warnings
from pathlib import Path

from .errors import WinaconvError
from .sources import resolve_device


def _load(model: str, device: str, dtype: str):
    from .evaluate import find_model, load_model, load_tokenizer, resolve_dtype

    ref = find_model(model)
    loaded = load_model(ref, device, resolve_dtype(dtype, device))
    return ref, loaded, load_tokenizer(ref)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_generate(model, prompt, sparsity, max_new_tokens, sample, temperature, top_p, chat, device, dtype, say=print):
    from transformers import TextStreamer

    from .evaluate import parse_levels

    device = resolve_device(device)
    ref, loaded, tokenizer = _load(model, device, dtype)
    level = sparsity if sparsity is not None else (loaded.settings.default_sparsity if loaded.settings else 0.0)
    parse_levels((level,), ref)
    loaded.set_sparsity(level)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise WinaconvError(f"{ref.name} has no chat template; drop --chat")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    options = dict(max_new_tokens=max_new_tokens, do_sample=sample)
    if sample:
        options.update(temperature=temperature, top_p=top_p)
    streamer = TextStreamer(tokenizer, skip_prompt=chat, skip_special_tokens=True)
    start = time.perf_counter()
    out = loaded.model.generate(encoded.input_ids, attention_mask=encoded.attention_mask, streamer=streamer, **options)
    _sync(device)
    seconds = time.perf_counter() - start
    new = out.shape[1] - encoded.input_ids.shape[1]
    say(f"{new} tokens, {1000 * seconds / new:.1f} ms/token, {new / seconds:.1f} tokens/s, "
        f"sparsity {level:g}, {device}")
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


def run_bench(model, levels, new_tokens, prompt_tokens, batch, device, dtype, save):
    import torch
    from transformers import GenerationMixin

    from .evaluate import parse_levels

    device = resolve_device(device)
    ref, loaded, _ = _load(model, device, dtype)
    levels = parse_levels(levels, ref) if levels else ref.available()
    if new_tokens < 2:
        raise WinaconvError("--new-tokens must be at least 2")
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
                save_to=str(Path(model) / "winaconv_results.json") if save else None)


def save_speed(report: dict) -> None:
    path = Path(report["save_to"])
    results = json.loads(path.read_text()) if path.is_file() else {}
    results["speed"] = {k: round(v, 3) for k, v in report["speed"].items()}
    results["speed_note"] = (f"{report['device']}, {report['dtype']}, batch {report['batch']}, "
                             f"{report['prompt_tokens']}-token prompt, model.generate() (winaconv bench)")
    path.write_text(json.dumps(results, indent=2) + "\n")
