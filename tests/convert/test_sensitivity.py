"""The output divergence of each layer made sparse, and the allocation it drives (winaconv/convert/sensitivity.py)."""

import torch

from winaconv.convert.allocate import apply_thresholds, clear_thresholds, layer_targets
from winaconv.convert.calibrate import CalibrationSettings, calibrate_layers
from winaconv_runtime.architectures import parameter_shares

from models import runtime_llama


def test_output_divergences_grow_with_sparsity_and_allocate_the_level():
    from winaconv.convert.sensitivity import output_divergences

    model, family = runtime_llama(silence_attention=False)
    shares = parameter_shares(model.config)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    settings = CalibrationSettings(norm_scored=(), max_sparsity=0.5, greedy_sequences=2, micro_batch=2, path_limit=0.7)
    layers = calibrate_layers(model, family, ids, shares, settings)
    points = [0.25, 0.5, 0.7]
    curves = output_divergences(model, family, layers, ids[:2], shares, points, settings)
    assert len(curves) == len(layers) and all(len(c) == len(points) for c in curves)
    for curve in curves:
        assert 0 < curve[0] < curve[-1], curve  # KL is positive and larger at higher sparsity
    # one layer sparse by hand through the model's own forward gives the same divergence
    reference = torch.log_softmax(model(ids[:2]).logits[:, 24:].float(), -1)
    apply_thresholds(model.model.layers[1], family,
                      layers[1].thresholds_for(layers[1].sparsities_at(0.5, shares)), ())
    sparse = torch.log_softmax(model(ids[:2]).logits[:, 24:].float(), -1)
    clear_thresholds(model.model.layers[1], family)
    expected = (reference.exp() * (reference - sparse)).sum(-1).mean().item()
    assert abs(curves[1][1] - expected) <= 1e-4 * expected
    targets = layer_targets(layers, 0.5, shares, "divergence", (points, curves))
    assert abs(sum(targets) / len(targets) - 0.5) < 1e-9 and max(targets) <= 0.7 + 1e-9
