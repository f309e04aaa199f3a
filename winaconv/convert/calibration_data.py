"""Calibration text: a local file, a Hugging Face dataset, or an offline built-in fallback."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import WinaconvError

DEFAULT_DATASET = "tatsu-lab/alpaca"
BUILTIN_SOURCE = "builtin:python-docs"


@dataclass
class CalibrationText:
    source: str  # what the checkpoint records
    texts: list[str]
    note: str | None = None  # said to the user (e.g. why the fallback was taken)


def read_text_file(path: str | os.PathLike) -> list[str]:
    """Texts of a .txt file (one text) or a .jsonl file (the 'text' field, else all string fields)."""
    file = Path(path)
    if not file.is_file():
        raise WinaconvError(f"text file not found: {path}")
    raw = decode_text(file.read_bytes(), path)
    if file.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise WinaconvError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            texts.append(_record_text(record))
    else:
        texts = [raw]
    texts = [t for t in texts if t.strip()]
    if not texts:
        if file.suffix == ".jsonl" and raw.strip():
            raise WinaconvError(f"{path}: no record has a 'text' field (or any other string field)")
        raise WinaconvError(f"text file is empty: {path}")
    return texts


def decode_text(data: bytes, path) -> str:
    """UTF-8 text; a file that is mostly undecodable or full of control bytes is not text (a binary file,
    a wrong encoding) and would calibrate on noise."""
    text = data.decode("utf-8", errors="replace")
    if not text:
        return text
    bad = text.count("\ufffd") + sum(1 for c in text if c < " " and c not in "\t\n\r\f")
    if bad > 0.01 * len(text):
        raise WinaconvError(f"{path} is not UTF-8 text ({bad} of {len(text)} characters undecodable or "
                            "control bytes)")
    return text


def _record_text(record) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            return record["text"]
        return "\n".join(v for v in record.values() if isinstance(v, str))
    return ""


def builtin_texts() -> list[str]:
    """English prose that ships with every Python: the reference topics of pydoc."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def _dataset_texts(name: str) -> list[str]:
    import datasets  # optional: only for users online

    rows = datasets.load_dataset(name, split="train")
    return [t for t in (_record_text(row) for row in rows) if t.strip()]


def _offline() -> bool:
    return any(os.environ.get(v, "0").lower() not in ("0", "", "false") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_calibration_text(calib_file=None, calib_dataset=None) -> CalibrationText:
    if calib_file:
        return CalibrationText(f"file:{Path(calib_file).name}", read_text_file(calib_file))
    name = calib_dataset or DEFAULT_DATASET
    reason = None
    if _offline():
        reason = "offline (HF_HUB_OFFLINE)"
    else:
        try:
            return CalibrationText(f"dataset:{name}", _dataset_texts(name))
        except ImportError:
            reason = "the 'datasets' package is not installed"
        except Exception as exc:  # network, auth or a missing dataset: all mean "use the fallback"
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if calib_dataset:
        raise WinaconvError(f"cannot load calibration dataset {calib_dataset}: {reason}")
    note = f"calibration dataset {name} unavailable ({reason}); using built-in Python documentation text"
    return CalibrationText(BUILTIN_SOURCE, builtin_texts(), note)


def token_sequences(tokenizer, texts: list[str], seq_len: int, num_tokens: int, seed: int) -> torch.Tensor:
    """[n, seq_len] token ids: the texts joined by EOS, cut into windows, n = num_tokens // seq_len sampled."""
    separator = tokenizer.eos_token or "\n\n"
    ids = tokenizer(separator.join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = ids.numel() // seq_len
    if windows == 0:
        raise WinaconvError(f"calibration text has {ids.numel()} tokens, fewer than one sequence of {seq_len}")
    wanted = max(1, num_tokens // seq_len)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows, generator=generator)[: min(wanted, windows)].sort().values
    return ids[: windows * seq_len].view(windows, seq_len)[order]
