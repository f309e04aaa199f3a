"""How far the model's output moves when one decoder layer is sparse: the yardstick of the "divergence"
layer allocation (calibrate.layer_targets).

For every layer and a few weighted sparsities along its greedy path, that layer runs at the sparsity while
all others stay dense, and the mean KL divergence of the next-token distributions from the dense model's
is measured on the last positions of the greedy-search sequences. Unlike a block's own output error, this
counts what the rest of the model does with the error. Layers go to the compute device one at a time, as
in the calibration; cost: about layers^2 / 2 x points layer passes over the greedy sequences.
"""

import torch
import torch.nn.functional as F

from winaconv_runtime.modeling_winaconv import sparse_linears

from .calibrate import LayerCalibration, _apply_thresholds, capture_layer_inputs, layer_outputs


def _log_probs(model, hidden: torch.Tensor, device) -> torch.Tensor:
    """Next-token log-probabilities from final hidden states (Gemma 2's logit soft-capping included)."""
    head = [model.model.norm.to(device), model.lm_head.to(device)]
    logits = head[1](head[0](hidden.to(device))).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    for module in head:
        module.to("cpu")
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def output_divergences(model, family, layers: list[LayerCalibration], input_ids: torch.Tensor, shares: dict,
                       points: list[float], settings) -> list[list[float]]:
    """KL(dense || layer l sparse at points[k]) for every layer l and point k, on `input_ids`."""
    device = settings.device
    decoder_layers = list(model.model.layers)
    hidden, layer_kwargs = capture_layer_inputs(model, input_ids, device)
    tail = int(input_ids.shape[1] * (1 - settings.tail_fraction))

    def run_from(index, hidden):
        for layer, kwargs in zip(decoder_layers[index:], layer_kwargs[index:]):
            layer.to(device)
            hidden = layer_outputs(layer, hidden, kwargs, device, settings.micro_batch)
            layer.to("cpu")
        return hidden

    inputs = []  # each layer's dense input
    for layer, kwargs in zip(decoder_layers, layer_kwargs):
        inputs.append(hidden)
        layer.to(device)
        hidden = layer_outputs(layer, hidden, kwargs, device, settings.micro_batch)
        layer.to("cpu")
    reference = _log_probs(model, hidden[:, tail:], device)
    curves = []
    for index, (layer, calibration) in enumerate(zip(decoder_layers, layers)):
        curve = []
        for point in points:
            sparsities = calibration.sparsities_at(point, shares)
            _apply_thresholds(layer, family, calibration.thresholds_for(sparsities), settings.norm_scored)
            final = run_from(index, inputs[index])
            for _, linear in sparse_linears(layer, family):
                linear.set_thresholds(None, None)
            log_probs = _log_probs(model, final[:, tail:], device)
            curve.append((reference.exp() * (reference - log_probs)).sum(-1).mean().item())
        curves.append(curve)
    return curves

