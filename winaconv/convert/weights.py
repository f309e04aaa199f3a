"""A source model's weights, read tensor by tensor in float32 under their state-dict names.

- a safetensors folder (one file or shards with their index; a Hub snapshot is one): each read opens the files it
  needs and closes them, so the memory-mapped pages it touched leave the process with them;
- a GGUF file: the tensors one at a time through the gguf package, dequantized and reordered by transformers'
  own GGUF tensor processors (the ones from_pretrained uses), so the values equal a whole-model load's;
- a model already loaded whole (--in-memory): its state dict.
"""

import contextlib
import functools
import os
from pathlib import Path

import torch

from .. import sources
from ..errors import WinaconvError
from .expert_weights import with_fused_experts


@contextlib.contextmanager
def _one_line_errors(name: str):
    """A truncated or corrupt file, met when opened or when a layer is read, is one line for the user."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WinaconvError(f"cannot load the weights of {name}: {first}") from None


class FolderWeights:
    def __init__(self, folder: Path, name: str | None = None):
        self.folder, self.name = Path(folder), name or Path(folder).name
        with _one_line_errors(self.name):
            self._list_files()

    def _list_files(self) -> None:
        import json

        from safetensors import safe_open

        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {name: self.folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {}
            for path in sorted(self.folder.glob("*.safetensors")):
                with safe_open(path, framework="pt") as handle:
                    self.files.update((name, path) for name in handle.keys())

    def names(self) -> set[str]:
        return set(self.files)

    def read(self, names) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors = {}
        with _one_line_errors(self.name):
            for path, wanted in by_file.items():
                with safe_open(path, framework="pt") as handle:
                    for name in wanted:
                        tensors[name] = handle.get_tensor(name).to(torch.float32)
        return tensors

    def fingerprint(self) -> list:
        """Name, size and modification time of every weight file (as make and rsync tell files apart)."""
        return sorted([path.name, (stat := os.stat(path)).st_size, stat.st_mtime_ns] for path in set(self.files.values()))


@contextlib.contextmanager
def _name_table_built_once():
    """transformers' get_gguf_hf_weights_map rebuilds gguf's tensor-name table for every submodule of the model
    (about 400 for a 30-layer one) though the table depends only on (architecture, layers): remembered for the
    call, it is built once."""
    import gguf

    build = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(build)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = build


class GGUFWeights:
    def __init__(self, path: Path, skeleton):
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field,
        )
        from gguf import GGUFReader

        self.path = Path(path)
        with _one_line_errors(self.path.name):
            self.reader = GGUFReader(self.path)  # parsing the metadata (the vocabulary) takes seconds: once
            architecture = read_field(self.reader, "general.architecture")[0]
        # the processors read head counts under transformers' config names: the model's own config has them
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=skeleton.config.to_dict())
        with _name_table_built_once():
            self.gguf_to_hf = get_gguf_hf_weights_map(skeleton, self.processor)
        self.present = {self.gguf_to_hf[t.name] for t in self.reader.tensors if t.name in self.gguf_to_hf}

    def names(self) -> set[str]:
        return set(self.present)

    def read(self, names) -> dict[str, torch.Tensor]:
        import mmap

        import numpy as np
        from gguf import dequantize

        wanted, tensors = set(names), {}
        for tensor in self.reader.tensors:
            if self.gguf_to_hf.get(tensor.name) not in wanted:
                continue
            result = self.processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                            tensor_key_mapping=self.gguf_to_hf, parsed_parameters={})
            tensors[self.gguf_to_hf[result.name]] = torch.from_numpy(np.copy(result.weights)).to(torch.float32)
        mapped = getattr(self.reader.data, "_mmap", None)
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)  # the file's pages read so far leave this process's memory
        return tensors

    def fingerprint(self) -> list:
        stat = os.stat(self.path)
        return [[self.path.name, stat.st_size, stat.st_mtime_ns]]


class ModelWeights:
    """A model loaded whole, read through its state dict (the tensors are shared, not copied)."""

    def __init__(self, model):
        self.state = model.state_dict()

    def names(self) -> set[str]:
        return set(self.state)

    def read(self, names) -> dict[str, torch.Tensor]:
        return {name: self.state[name] for name in names}


def check_complete(weights, needed, model_id: str) -> None:
    missing = sorted(set(needed) - weights.names())
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise WinaconvError(f"{model_id} has no tensor {missing[0]}{more} under the names transformers uses; "
                            "convert it with --in-memory (transformers' own loader)")


def open_weights(source: sources.ModelSource, skeleton):
    """(the source's weights, read tensor by tensor, and what identifies their files for resume.py); only
    metadata is read here."""
    if source.gguf_file:
        files = GGUFWeights(Path(source.location) / source.gguf_file, skeleton)
    else:
        local = Path(source.location)
        files = with_fused_experts(FolderWeights(local if local.is_dir() else sources.hub_snapshot(source),
                                                 source.model_id))
    identity = files.fingerprint()
    if not source.gguf_file and not Path(source.location).is_dir():
        identity = {"commit": files.folder.name, "files": identity}  # a Hub snapshot's folder is its commit
    return files, identity
