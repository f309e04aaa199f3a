"""TEAL's greedy allocation on cases whose right answer is known."""

import copy

import torch

import pytest

from winaconv.convert.allocate import (MAX_PROJECTION_SPARSITY, LayerCalibration, apply_thresholds, clear_thresholds,
                                       greedy_path, layer_targets)
from winaconv.convert.calibrate import CalibrationSettings, calibrate_layers
from winaconv.convert.layers import capture_layer_inputs, layer_outputs
from winaconv.convert.statistics import collect_statistics
from winaconv.convert.runtime_model import to_runtime_model, winaconv_section
from winaconv.convert.statistics import threshold_at
from winaconv_runtime.architectures import ATTENTION_PROJECTIONS, PROJECTIONS, parameter_shares
from winaconv_runtime.modeling_winaconv import attention_residual, mlp_residual, sparse_linears

from random_models import random_model


def runtime_llama(silence_attention: bool):
    base = random_model("llama")
    if silence_attention:
        with torch.no_grad():
            for layer in base.model.layers:
                layer.self_attn.o_proj.weight.zero_()  # attention adds nothing to the residual stream
    model, family = to_runtime_model(copy.deepcopy(base), winaconv_section("teal", "none", ()))
    return model, family


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


def test_power_law_recovers_a_known_curve():
    from winaconv.convert.allocate import power_law

    points = [0.25, 0.4, 0.5, 0.65, 0.8]
    a, b = power_law(points, [2.0 * p ** 3 for p in points])
    assert abs(a - 2.0) < 1e-9 and abs(b - 3.0) < 1e-9
    assert power_law(points, [0.5 * p ** 0.5 for p in points])[1] == 1.0  # concave fits are kept convex


def plain_greedy_path(layer, family, grids, inputs, reference, layer_kwargs, shares, settings):
    """TEAL's greedy search written plainly: every trial sets all seven thresholds and runs the whole block
    (attention on every position, the MLP on the measured ones), nothing reused."""
    tail = int(inputs.shape[1] * (1 - settings.tail_fraction))
    reference = reference[:, tail:].float()
    scale = reference.square().sum(dim=(0, 1)).sqrt().mean().item() or 1.0

    def block_error(sparsities):
        apply_thresholds(layer, family, {p: threshold_at(grids[p], sparsities[p]) for p in PROJECTIONS},
                         settings.norm_scored)
        output = mlp_residual(layer, attention_residual(layer, inputs, **layer_kwargs)[:, tail:])
        return (output.float() - reference).square().sum(dim=(0, 1)).sqrt().mean().item() / scale

    sparsity = {p: 0.0 for p in PROJECTIONS}
    path, errors = [sparsity], [block_error(sparsity)]
    while sum(shares[p] * sparsity[p] for p in PROJECTIONS) < settings.path_end - 1e-9:
        trials = [dict(sparsity, **{p: min(sparsity[p] + settings.greedy_step / shares[p], MAX_PROJECTION_SPARSITY)})
                  for p in PROJECTIONS if sparsity[p] < MAX_PROJECTION_SPARSITY]
        if not trials:
            break
        trial_errors = [block_error(trial) for trial in trials]
        best = trial_errors.index(min(trial_errors))  # the first of equal errors, in PROJECTIONS order
        sparsity = trials[best]
        path.append(sparsity)
        errors.append(trial_errors[best])
    clear_thresholds(layer, family)
    return path, errors


@pytest.mark.parametrize("family_name, method, transform", [
    ("llama", "wina", "none"), ("llama", "teal", "exact"), ("phi3", "wina", "none"), ("qwen3", "teal", "none"),
    ("gemma3_text", "wina", "exact"),
])
def test_greedy_search_reuses_work_without_changing_a_bit(family_name, method, transform):
    """The greedy search (which caches attention outputs and projection outputs across trials and steps) gives
    exactly the path and the errors of the plain search, layer after layer, on families with separate and
    fused projections, q/k norms, output norms and the exact transform's matrices; and leaves the layer as it
    found it."""
    norm_scored = PROJECTIONS if method == "wina" else ()
    model, family = to_runtime_model(random_model(family_name), winaconv_section(method, transform, norm_scored))
    shares = parameter_shares(model.config)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    settings = CalibrationSettings(norm_scored=norm_scored, max_sparsity=0.8, greedy_sequences=3, micro_batch=2)
    hidden, layer_kwargs = capture_layer_inputs(model, ids, "cpu")
    for layer, kwargs in zip(model.model.layers, layer_kwargs):
        grids, outputs = collect_statistics(layer, family, hidden, kwargs, settings, torch.Generator().manual_seed(0))
        arguments = (layer, family, grids, hidden[:3], outputs[:3], kwargs, shares, settings)
        path, errors = greedy_path(*arguments)
        assert not any("forward" in vars(module) for module in layer.modules())
        assert all(linear.tau is None for _, linear in sparse_linears(layer, family))
        expected_path, expected_errors = plain_greedy_path(*arguments)
        assert max(path[-1].values()) == MAX_PROJECTION_SPARSITY, "some projection reaches its cap"
        assert path == expected_path
        assert errors == expected_errors  # bit for bit
        hidden = outputs
