"""Perplexity of a model on held-out text at its stored sparsity levels, through the runtime's real sparse path.

A winaconv checkpoint is loaded through the installed runtime's model classes (loading.py), then
model.set_sparsity(level) for each level, so the numbers are those of the thresholds the runtime
applies: every token of every window is sparsified, prefill included. A plain model folder (no
'winaconv' section in config.json), a .gguf file or a Hub id is evaluated dense.

Sliding windows: the token stream is cut into windows of `window` tokens starting every
`stride` tokens, each run on its own (no cache carried over). A token is scored at most once,
by the first window that holds it with some context before it. With stride == window (the
default) the windows do not overlap and the first token of each window is context only; with
stride < window every token after the first is scored, the later ones with at least
window - stride tokens of context.
"""

import dataclasses
import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from winaconv_runtime.checkpoint_format import level_key

from .. import __version__, sources
from ..convert.calibration_data import read_text_file
from ..errors import WinaconvError
from ..options import EvalOptions, scoring_name
from .loading import LoadedModel, find_model, load_model, load_tokenizer, parse_levels, resolve_dtype

@dataclass
class LevelResult:
    sparsity: float
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # scored tokens
    seconds: float


@dataclass
class EvalReport:
    model: str
    text: str
    text_tokens: int  # tokens of the text used (after --max-tokens)
    window: int
    stride: int
    method: str  # "wina", "teal" or "dense" (a plain model)
    transform: str | None
    scoring: str | None  # "paper" (norms on all seven), "reference" (k and gate only), "magnitude" (teal)
    calibration: dict | None
    device: str
    dtype: str
    results: list[LevelResult]
    tasks: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


# ---------------------------------------------------------------- text and windows


def load_eval_text(text_file: str | None) -> tuple[str, list[str]]:
    """(source label, texts): a .txt/.jsonl file, or the built-in held-out text."""
    if text_file:
        return f"file:{Path(text_file).name}", read_text_file(text_file)
    from .eval_text import EVAL_SOURCE, eval_texts

    return EVAL_SOURCE, eval_texts()


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """One token stream: the texts joined by EOS (as calibration joins them), no special tokens added."""
    separator = tokenizer.eos_token or "\n\n"
    return tokenizer(separator.join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored): tokens [begin, end) go in, targets first_scored..end-1 are scored."""
    spans, scored_to = [], 1  # token 0 has no context
    begin = 0
    while scored_to < num_tokens:
        end = min(begin + window, num_tokens)
        spans.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        begin += stride
    return spans


def check_window(num_tokens: int, window: int, stride: int, source: str) -> None:
    if window < 2:
        raise WinaconvError(f"--window must be at least 2 tokens; got {window}")
    if not 1 <= stride <= window:
        raise WinaconvError(f"--stride must be between 1 and --window ({window}); got {stride}")
    if num_tokens < window:
        raise WinaconvError(f"{source} has {num_tokens} tokens, fewer than one window of {window}")


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int, stride: int, batch_size: int = 1, progress=None,
               description: str = "perplexity") -> tuple[float, int]:
    """(mean NLL in nats, scored tokens) of `ids` under `model`, sliding windows as in the module doc."""
    device = next(model.parameters()).device
    spans = windows(ids.numel(), window, stride)
    task = progress.add_task(description, total=len(spans)) if progress is not None else None
    total, count = 0.0, 0
    start = 0
    while start < len(spans):
        length = spans[start][1] - spans[start][0]
        group = [spans[start]]
        while (len(group) < batch_size and start + len(group) < len(spans)
               and spans[start + len(group)][1] - spans[start + len(group)][0] == length):
            group.append(spans[start + len(group)])
        batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for row, (begin, end, first) in enumerate(group):
            predicted = logits[row, first - begin - 1 : end - begin - 1].float()
            targets = batch[row, first - begin : end - begin]
            total += torch.nn.functional.cross_entropy(predicted, targets, reduction="sum").item()
            count += end - first
        del logits
        start += len(group)
        if task is not None:
            progress.advance(task, len(group))
    return total / count, count


# ---------------------------------------------------------------- the command's work


def versions() -> dict:
    import transformers

    return {"winaconv": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def evaluate(options: EvalOptions, progress=None, say=print) -> EvalReport:
    if options.stride is None:
        options = dataclasses.replace(options, stride=options.window)
    if options.max_tokens is not None and options.max_tokens < options.window:
        raise WinaconvError(f"--max-tokens {options.max_tokens} is smaller than one window of {options.window}")
    if options.text_file and not Path(options.text_file).is_file():
        raise WinaconvError(f"text file not found: {options.text_file}")
    if options.batch_size < 1:
        raise WinaconvError("--batch-size must be at least 1")
    unavailable = tasks_unavailable(options.tasks) if options.tasks else None
    if unavailable:  # said before the perplexity runs, not after
        raise WinaconvError(unavailable)
    ref = find_model(options.model, options.trust_checkpoint_code)
    if ref.context is not None and options.window > ref.context:  # the positions past it were never trained
        raise WinaconvError(f"--window {options.window} is longer than the model's context of {ref.context} positions")
    levels = parse_levels(options.levels, ref)
    source, texts = load_eval_text(options.text_file)
    device = sources.resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    ids = tokenize(load_tokenizer(ref), texts)
    if options.max_tokens is not None:
        ids = ids[: options.max_tokens]
    check_window(ids.numel(), options.window, options.stride, source)

    say(f"loading {options.model}")
    loaded = load_model(ref, device, dtype)
    results = []
    for level in levels:
        loaded.set_sparsity(level)
        started = time.perf_counter()
        nll, count = perplexity(loaded.model, ids, options.window, options.stride, options.batch_size, progress,
                                description=f"sparsity {level:g}")
        results.append(LevelResult(level, math.exp(nll), nll, count, time.perf_counter() - started))
        say(f"sparsity {level:g}: perplexity {math.exp(nll):.3f} over {count} tokens")

    section = ref.section
    report = EvalReport(
        model=str(options.model),
        text=source,
        text_tokens=int(ids.numel()),
        window=options.window,
        stride=options.stride,
        method=section.get("method", "?") if section else "dense",
        transform=section.get("transform") if section else None,
        scoring=scoring_name(section),
        calibration=section.get("calibration") if section else None,
        device=device,
        dtype=str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        results=results,
        versions=versions(),
    )
    if options.tasks:
        report.tasks = run_tasks(loaded, load_tokenizer(ref), levels, options.tasks, options.batch_size)
    return report


# ---------------------------------------------------------------- zero-shot tasks (optional)


def _offline() -> str | None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(name, "0").lower() not in ("0", "", "false"):
            return name
    return None


def tasks_unavailable(tasks) -> str | None:
    """Why zero-shot tasks cannot run here, in one line; None if they may."""
    names = ",".join(tasks)
    if importlib.util.find_spec("lm_eval") is None:
        return f"tasks {names} cannot be run: lm-evaluation-harness is not installed (pip install lm_eval)"
    offline = _offline()
    if offline:
        return f"tasks {names} cannot be run: {offline} is set and their data must be downloaded"
    return None


def run_tasks(loaded: LoadedModel, tokenizer, levels, tasks, batch_size: int) -> dict:
    """lm-evaluation-harness zero-shot accuracy per level, or {'error': one line} when it cannot run."""
    reason = tasks_unavailable(tasks)
    if reason:
        return {"error": reason}
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        by_level = {}
        for level in levels:
            loaded.set_sparsity(level)
            lm = HFLM(pretrained=loaded.model, tokenizer=tokenizer, batch_size=batch_size)
            output = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=0)
            by_level[level_key(level)] = {
                task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not k.startswith("alias")}
                for task, metrics in output["results"].items()
            }
        return {"results": by_level}
    except Exception as exc:  # data not reachable, task names unknown, harness API changes: one line, no traceback
        detail = str(exc).splitlines()[0][:160] if str(exc) else ""
        return {"error": f"tasks {','.join(tasks)} cannot be run: {type(exc).__name__}: {detail}"}
