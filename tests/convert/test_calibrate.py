"""Per-layer calibration in order (winaconv/convert/calibrate.py)."""

import torch

from winaconv.convert.allocate import apply_thresholds, clear_thresholds
from winaconv.convert.calibrate import CalibrationSettings, calibrate_layers
from winaconv.convert.layers import capture_layer_inputs, layer_outputs
from winaconv.convert.statistics import collect_statistics
from winaconv_runtime.architectures import PROJECTIONS, parameter_shares

from models import runtime_llama


def test_sparse_upstream_changes_only_what_follows_a_sparse_layer():
    """Layer 0 sees the embeddings either way; layer 1's statistics come from layer 0's sparse outputs,
    which are exactly layer 0 run at its allocation of the upstream level."""
    model, family = runtime_llama(silence_attention=False)
    shares = parameter_shares(model.config)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))

    def settings(upstream_level):
        return CalibrationSettings(norm_scored=(), max_sparsity=0.5, greedy_sequences=4, micro_batch=2,
                                   upstream_level=upstream_level)

    dense = calibrate_layers(model, family, ids, shares, settings(None))
    sparse = calibrate_layers(model, family, ids, shares, settings(0.5))
    for p in PROJECTIONS:
        assert torch.equal(dense[0].grids[p], sparse[0].grids[p])
    assert any(not torch.equal(dense[1].grids[p], sparse[1].grids[p]) for p in PROJECTIONS)
    # replay: layer 0 at its 50% thresholds, then layer 1's dense statistics on those outputs
    hidden, kwargs = capture_layer_inputs(model, ids, "cpu")
    layer0, layer1 = model.model.layers[:2]
    apply_thresholds(layer0, family, sparse[0].thresholds_for(sparse[0].sparsities_at(0.5, shares)), ())
    outputs = layer_outputs(layer0, hidden, kwargs[0], "cpu", micro_batch=2)
    clear_thresholds(layer0, family)
    grids, _ = collect_statistics(layer1, family, outputs, kwargs[1], settings(0.5),
                                  _generator_after_layer_zero(model, family, hidden, kwargs))
    for p in PROJECTIONS:
        assert torch.equal(grids[p], sparse[1].grids[p])


def _generator_after_layer_zero(model, family, hidden, kwargs):
    """The sampling generator in the state calibrate_layers leaves it after layer 0's statistics."""
    generator = torch.Generator().manual_seed(0)
    collect_statistics(model.model.layers[0], family, hidden, kwargs[0], CalibrationSettings(
        norm_scored=(), max_sparsity=0.5, greedy_sequences=4, micro_batch=2), generator)
    return generator
