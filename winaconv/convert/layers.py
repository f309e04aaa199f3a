"""The decoder layers, one at a time: the container that opens them (read from the source weights into the
runtime model's skeleton, or the model's own), the state-dict names they hold, and the inputs they see.

In a streamed conversion the skeleton (runtime_model.skeleton) has real ends (embeddings, final norm, lm_head)
and real buffers, and a decoder layer holds tensors only inside `DecoderLayers.open`, read from the source
weights (weights.py), then dropped back to the meta device.
"""

import contextlib

import torch

from .runtime_model import is_exact_extra
from .write import saved_state_names

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


@torch.no_grad()
def load_ends(model, weights) -> None:
    """Embeddings, final norm and lm_head (tied to the embeddings where the config says so) from `weights`."""
    ends = [n for n in needed_names(model) if not n.startswith(LAYER_PREFIX)]
    model.load_state_dict(weights.read(ends), strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()


class DecoderLayers:
    """The decoder layers of `model`, one at a time: `with layers.open(i) as layer`. Without `weights`, the
    model's own layers (a model held whole in memory); with `weights`, each layer is read from them into the
    meta-device skeleton, cast to `dtype`, and dropped back to the meta device when closed. `prepare(layer,
    index)` runs on each layer as read (the basis pass folds norms with it)."""

    def __init__(self, model, weights=None, dtype: torch.dtype | None = None, prepare=None):
        self.model, self.weights, self.dtype, self.prepare = model, weights, dtype, prepare

    def __len__(self) -> int:
        return len(self.model.model.layers)

    @contextlib.contextmanager
    def open(self, index: int):
        layer = self.model.model.layers[index]
        if self.weights is None:
            yield layer
            return
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



class _RecordingLayer(torch.nn.Module):
    """Stands in for a decoder layer: records what the decoder passes it and returns its input."""

    def __init__(self, index: int, records: dict):
        super().__init__()
        self.index, self.records = index, records

    def forward(self, hidden_states, **kwargs):
        if self.index == 0:
            self.records["hidden"] = hidden_states
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "cache", "use_cache")}
        self.records.setdefault("kwargs", {}).setdefault(self.index, kwargs)
        return hidden_states


@torch.no_grad()
def capture_layer_inputs(model, input_ids: torch.Tensor, device) -> tuple[torch.Tensor, list[dict]]:
    """Hidden states entering the first decoder layer for every sequence, and per layer the keyword
    arguments (position embeddings, mask) the decoder passes it, for one sequence. Per layer, since
    Gemma alternates sliding-window and global layers with their own masks and rotary tables."""
    decoder = model.model
    real_layers = decoder.layers
    records = {}
    decoder.layers = torch.nn.ModuleList(_RecordingLayer(i, records) for i in range(len(real_layers)))
    others = [m for name, m in decoder.named_children() if name != "layers"]
    for module in others:
        module.to(device)
    hidden = []
    try:
        for sequence in input_ids:
            decoder(input_ids=sequence[None].to(device), use_cache=False)
            hidden.append(records["hidden"])
    finally:
        decoder.layers = real_layers
        for module in others:
            module.to("cpu")
    return torch.cat(hidden), [records["kwargs"][i] for i in range(len(real_layers))]


def _output(result):
    return result[0] if isinstance(result, tuple) else result


def layer_outputs(layer, hidden, layer_kwargs, device, micro_batch: int) -> torch.Tensor:
    """The layer applied to every sequence, micro-batches on `device`, results where `hidden` lives."""
    return torch.cat([_output(layer(chunk.to(device), **layer_kwargs)).to(hidden.device)
                      for chunk in hidden.split(micro_batch)])
