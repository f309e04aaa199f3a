"""Writing the checkpoint: safetensors shards tensor by tensor, then the config, tokenizer and runtime files.

The shard plan (which tensor goes in which file) is huggingface_hub's split, computed from names, shapes and
dtypes alone; each file's header is written first and every tensor at its offset when it is ready, so a
streamed conversion holds one layer's tensors at a time, never a whole shard, and a resumed one fills in
the files it left. A file's layout is the one safetensors' own writer gives (tensors ordered by dtype, largest
first, then by name; JSON header padded with spaces to 8 bytes), so files compare tensor for tensor with it.
"""

import json
import os
import re
import struct
from pathlib import Path

import torch

from winaconv_runtime.modeling_winaconv import classes_for

from ..checkpoint.code import runtime_sources
from ..errors import WinaconvError

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
# safetensors' dtype enum order, which sorts a file's tensors (largest first)
_DTYPE_ORDER = ("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64")
INDEX_NAME = "model.safetensors.index.json"


def _layout(specs: dict[str, tuple[torch.dtype, tuple[int, ...]]], metadata: dict) -> tuple[bytes, dict]:
    """(header bytes including the 8-byte length, name -> (offset in file, bytes))."""
    names = sorted(specs, key=lambda n: (-_DTYPE_ORDER.index(SAFETENSORS_DTYPES[specs[n][0]]), n))
    entries, places, offset = {"__metadata__": dict(metadata)}, {}, 0
    for name in names:
        dtype, shape = specs[name]
        size = torch.Size(shape).numel() * dtype.itemsize
        entries[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        places[name] = (offset, size)
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {n: (start + o, s) for n, (o, s) in places.items()}


def _mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


class ShardedWriter:
    """Shards of `specs` (name -> (dtype, shape)) in `folder`, with the standard index when there are several
    and `metadata` in every file. `put` writes one tensor; `sync` makes what was written durable. With
    `resume`, files already there are reused (their headers must be the planned ones)."""

    def __init__(self, folder: Path, specs: dict, max_shard_bytes: int, metadata: dict, resume: bool = False):
        from huggingface_hub import split_torch_state_dict_into_shards

        self.folder = Path(folder)
        meta = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (dtype, shape) in specs.items()}
        split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_bytes)
        self.specs, self.places, self.files = dict(specs), {}, {}
        for filename, names in split.filename_to_tensors.items():
            header, places = _layout({n: specs[n] for n in names}, metadata)
            path = self.folder / filename
            if resume and path.is_file():
                fd = os.open(path, os.O_RDWR)
                if os.pread(fd, len(header), 0) != header:
                    os.close(fd)
                    raise ValueError(f"{path} was planned differently; it cannot be resumed")
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, _mode())
                os.pwrite(fd, header, 0)
                os.ftruncate(fd, len(header) + sum(size for _, size in places.values()))
            self.files[filename] = fd
            self.places.update({n: (filename, offset, size) for n, (offset, size) in places.items()})
        self.written: set[str] = set()  # by this writer, or by the run it resumes (mark_written)
        if split.is_sharded:
            total = sum(torch.Size(shape).numel() * dtype.itemsize for dtype, shape in specs.values())
            index = {"metadata": {**metadata, "total_size": total}, "weight_map": split.tensor_to_filename}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def put(self, name: str, tensor: torch.Tensor) -> None:
        dtype, shape = self.specs[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            raise ValueError(f"{name}: planned {dtype} {tuple(shape)}, got {tensor.dtype} {tuple(tensor.shape)}")
        filename, offset, size = self.places[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        view, done = memoryview(data), 0
        while done < size:  # pwrite may write less than asked (large tensors, signals)
            done += os.pwrite(self.files[filename], view[done:], offset + done)
        self.written.add(name)

    def mark_written(self, names) -> None:
        self.written.update(names)

    def sync(self) -> None:
        for fd in self.files.values():
            os.fsync(fd)

    def close(self) -> None:
        missing = sorted(set(self.specs) - self.written)
        for fd in self.files.values():
            os.close(fd)
        self.files = {}
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written, e.g. {missing[0]}")


def save_sharded(state: dict, folder: Path, max_shard_bytes: int, metadata: dict) -> None:
    """Every tensor of `state` into shards at once (the in-memory writer)."""
    writer = ShardedWriter(folder, {n: (t.dtype, tuple(t.shape)) for n, t in state.items()}, max_shard_bytes, metadata)
    try:
        for name, tensor in state.items():
            writer.put(name, tensor)
    finally:
        writer.close()


def parse_shard_size(value) -> int:
    """--max-shard-size: bytes, or a number with a unit (5GB, 500MB, 2GiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value), flags=re.IGNORECASE)
    unit = match and match.group(2).upper()
    if not match or unit not in SIZE_UNITS or float(match.group(1)) * SIZE_UNITS[unit] < 1:
        raise WinaconvError(f"--max-shard-size must be a size such as 5GB, 500MB or 2GiB; got {value!r}")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def write_checkpoint_files(model, family, tokenizer, folder: Path) -> None:
    """Everything but the weights: config with auto_map, generation config, tokenizer, the runtime's sources."""
    config = model.config
    config.auto_map = classes_for(family, config.winaconv["transform"])
    config.architectures = [config.auto_map["AutoModelForCausalLM"].split(".", 1)[1]]
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for name, data in runtime_sources().items():
        (folder / name).write_bytes(data)


def saved_state_names(model) -> list[str]:
    """The tensors a checkpoint stores, in state-dict order (a tied lm_head is the embeddings')."""
    names = list(model.state_dict())
    return [n for n in names if not (n == "lm_head.weight" and model.config.tie_word_embeddings)]
