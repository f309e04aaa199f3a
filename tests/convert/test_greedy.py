"""The greedy search's block outputs, each piece computed once, equal a plain forward per trial bit for bit
(winaconv/convert/greedy.py)."""

import pytest
import torch

from winaconv.convert.allocate import MAX_PROJECTION_SPARSITY, apply_thresholds, clear_thresholds, greedy_path
from winaconv.convert.calibrate import CalibrationSettings
from winaconv.convert.layers import capture_layer_inputs
from winaconv.convert.runtime_model import to_runtime_model, winaconv_section
from winaconv.convert.statistics import collect_statistics, threshold_at
from winaconv_runtime.architectures import PROJECTIONS, parameter_shares
from winaconv_runtime.modeling_winaconv import attention_residual, mlp_residual, sparse_linears

from models import random_model


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
