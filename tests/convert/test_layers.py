"""The inputs each decoder layer sees during calibration (winaconv/convert/layers.py)."""

import pytest
import torch

from winaconv.convert.layers import capture_layer_inputs, layer_outputs

from models import GEMMA_FAMILIES, random_model, transformed
from support import max_relative_error


@pytest.mark.parametrize("family", GEMMA_FAMILIES)
def test_calibration_replays_each_layer_with_its_own_mask(family):
    """Layer by layer with the captured per-layer arguments gives the model's own last hidden state:
    sliding-window and global layers get their own masks (and, for Gemma 3, rotary tables)."""
    model, _ = transformed(random_model(family), "none")
    ids = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden, per_layer = capture_layer_inputs(model, ids, "cpu")
        for layer, kwargs in zip(model.model.layers, per_layer):
            hidden = layer_outputs(layer, hidden, kwargs, "cpu", micro_batch=2)
        expected = model.model(ids).last_hidden_state
        replayed = model.model.norm(hidden)
        assert max_relative_error(replayed, expected) <= 1e-5
        # with the first layer's (sliding) arguments everywhere, the global layer would differ
        hidden = capture_layer_inputs(model, ids, "cpu")[0]
        for layer in model.model.layers:
            hidden = layer_outputs(layer, hidden, per_layer[0], "cpu", micro_batch=2)
        assert max_relative_error(model.model.norm(hidden), expected) > 1e-3
