"""A runtime model whose decoder layers are onloaded one at a time.

The skeleton is built on the meta device; its ends (embeddings, final norm, lm_head) and the buffers no
checkpoint stores (rotary tables, Gemma's embedding scale) are real, and a decoder layer holds tensors only
inside `StreamedLayers.open`, read from the source weights (weights.py), prepared (the transform) and cast to
the working dtype, then dropped back to the meta device.
"""

import contextlib

import torch

from .checkpoint import saved_state_names
from .runtime_model import is_exact_extra, runtime_config

LAYER_PREFIX = "model.layers."


def end_names(model) -> list[str]:
    """State-dict names outside the decoder layers (embeddings, final norm, lm_head)."""
    return [name for name in model.state_dict() if not name.startswith(LAYER_PREFIX)]


def layer_names(model, index: int) -> list[str]:
    prefix = f"{LAYER_PREFIX}{index}."
    return [prefix + name for name in model.model.layers[index].state_dict()]


def needed_names(model) -> list[str]:
    """Every tensor a source must provide (the exact transform's matrices and a tied lm_head are made here)."""
    return [n for n in saved_state_names(model) if not is_exact_extra(n)]


def skeleton(base_config, section: dict):
    """The runtime model of `base_config` on the meta device, but for the buffers no checkpoint holds
    (rotary tables, embedding scales), computed as from_pretrained computes them."""
    cls, config, _ = runtime_config(base_config, section)
    with torch.device("meta"):
        model = cls(config)
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
    return model.eval()


@torch.no_grad()
def load_ends(model, weights) -> None:
    """Embeddings, final norm and lm_head (tied to the embeddings where the config says so) from `weights`."""
    ends = [n for n in needed_names(model) if not n.startswith(LAYER_PREFIX)]
    model.load_state_dict(weights.read(ends), strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()


class StreamedLayers:
    """Decoder layers of `model` read from `weights` one at a time: `with layers.open(i) as layer`."""

    def __init__(self, model, weights, prepare=None, dtype: torch.dtype | None = None):
        self.model, self.weights, self.prepare, self.dtype = model, weights, prepare, dtype

    def __len__(self) -> int:
        return len(self.model.model.layers)

    @contextlib.contextmanager
    def open(self, index: int):
        layer = self.model.model.layers[index]
        names = layer_names(self.model, index)
        present = self.weights.names()
        tensors = self.weights.read([n for n in names if n in present])
        for name in names:
            if name not in tensors and is_exact_extra(name):  # the exact transform's matrices start as identity
                tensors[name] = torch.eye(layer.get_parameter(_local(name, index)).shape[0])
        layer.load_state_dict({_local(n, index): t for n, t in tensors.items()}, strict=True, assign=True)
        try:
            if self.prepare is not None:
                self.prepare(layer, index)
            if self.dtype is not None:
                layer.to(self.dtype)
            yield layer
        finally:
            layer.to("meta")


def _local(name: str, index: int) -> str:
    return name[len(f"{LAYER_PREFIX}{index}."):]
