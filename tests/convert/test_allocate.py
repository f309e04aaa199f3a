"""TEAL's greedy path within a layer and the split of a level across layers (winaconv/convert/allocate.py)."""

import pytest
import torch

from winaconv.convert.allocate import MAX_PROJECTION_SPARSITY, LayerCalibration, layer_targets
from winaconv.convert.calibrate import CalibrationSettings, calibrate_layers
from winaconv_runtime.architectures import ATTENTION_PROJECTIONS, PROJECTIONS, parameter_shares

from models import runtime_llama


def calibrate(model, family, max_sparsity, path_limit=None):
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    settings = CalibrationSettings(norm_scored=(), max_sparsity=max_sparsity, greedy_sequences=4, micro_batch=2,
                                   path_limit=path_limit)
    return calibrate_layers(model, family, ids, parameter_shares(model.config), settings)


def test_greedy_spends_sparsity_where_it_costs_nothing():
    """With o_proj zeroed, sparsifying q/k/v/o changes no output: the greedy path must max out
    all four attention projections before it touches any MLP projection."""
    model, family = runtime_llama(silence_attention=True)
    shares = parameter_shares(model.config)
    attention_share = sum(shares[p] for p in ATTENTION_PROJECTIONS)
    results = calibrate(model, family, max_sparsity=attention_share * MAX_PROJECTION_SPARSITY + 0.05)
    for layer in results:
        first_mlp_step = next(i for i, s in enumerate(layer.path) if any(s[p] > 0 for p in ("gate", "up", "down")))
        before = layer.path[first_mlp_step - 1]
        assert all(before[p] == MAX_PROJECTION_SPARSITY for p in ATTENTION_PROJECTIONS), before


def test_greedy_reaches_each_level_exactly():
    model, family = runtime_llama(silence_attention=False)
    shares = parameter_shares(model.config)
    results = calibrate(model, family, max_sparsity=0.5)
    for layer in results:
        weighted = [sum(shares[p] * s[p] for p in PROJECTIONS) for s in layer.path]
        assert all(b > a for a, b in zip(weighted, weighted[1:])), "every step raises the layer's sparsity"
        for target in (0.1, 0.25, 0.4, 0.5):
            reached = layer.sparsities_at(target, shares)
            assert abs(sum(shares[p] * reached[p] for p in PROJECTIONS) - target) < 1e-9
            assert all(0.0 <= reached[p] <= MAX_PROJECTION_SPARSITY for p in PROJECTIONS)


def test_thresholds_realize_the_allocated_sparsity():
    """The threshold of a projection at sparsity s drops a fraction s of its calibration scores."""
    grid = torch.linspace(0, 1, 2049) ** 2  # quantiles of some score distribution
    layer = LayerCalibration(grids={p: grid for p in PROJECTIONS}, path=[{p: 0.0 for p in PROJECTIONS}], errors=[0.0])
    for s in (0.0, 0.25, 0.5, 0.9):
        t = layer.thresholds_for({p: s for p in PROJECTIONS})["q"]
        assert abs(t - s**2) < 1e-6


def line_layer(slope: float, end: float = 0.9, steps: int = 36) -> LayerCalibration:
    """A layer whose path raises every projection together and whose error grows as slope * sparsity^2."""
    levels = [end * i / steps for i in range(steps + 1)]
    return LayerCalibration(grids={}, path=[{p: w for p in PROJECTIONS} for w in levels],
                            errors=[slope * w * w for w in levels])


def test_error_allocation_meets_the_level_and_favours_cheap_layers():
    shares = {p: 1 / len(PROJECTIONS) for p in PROJECTIONS}
    layers = [line_layer(1.0), line_layer(4.0), line_layer(1.0, end=0.3)]
    assert layer_targets(layers, 0.4, shares, "uniform") == [0.4, 0.4, 0.4]
    targets = layer_targets(layers, 0.4, shares, "error")
    assert abs(sum(targets) / 3 - 0.4) < 1e-9
    assert targets[2] <= 0.3 + 1e-9, "a layer never goes past the end of its path"
    assert targets[0] > targets[1], "the cheaper layer carries more of the sparsity"
    # errors w^2 and 4 w^2: the optimum equalises the marginal errors (2 w0 = 8 w1) at a mean of 0.5
    even = layer_targets([line_layer(1.0), line_layer(4.0)], 0.5, shares, "error")
    assert abs(even[0] - 0.8) <= 0.0125 + 1e-9 and abs(even[1] - 0.2) <= 0.0125 + 1e-9
    with pytest.raises(ValueError):
        layer_targets([line_layer(1.0, end=0.3)], 0.5, shares, "error")


def test_greedy_path_records_relative_errors_that_grow():
    model, family = runtime_llama(silence_attention=False)
    shares = parameter_shares(model.config)
    results = calibrate(model, family, max_sparsity=0.4, path_limit=0.6)
    for layer in results:
        assert len(layer.errors) == len(layer.path)
        assert layer.weighted(shares)[-1] >= 0.6 - 1e-9, "the path runs to its limit"
        assert layer.errors[0] < 1e-3 < layer.errors[-1] < 1.0
        assert layer.errors[-1] > layer.errors[len(layer.errors) // 2]
    targets = layer_targets(results, 0.4, shares, "error")
    assert abs(sum(targets) / len(targets) - 0.4) < 1e-9


def test_power_law_recovers_a_known_curve():
    from winaconv.convert.allocate import power_law

    points = [0.25, 0.4, 0.5, 0.65, 0.8]
    a, b = power_law(points, [2.0 * p ** 3 for p in points])
    assert abs(a - 2.0) < 1e-9 and abs(b - 3.0) < 1e-9
    assert power_law(points, [0.5 * p ** 0.5 for p in points])[1] == 1.0  # concave fits are kept convex
