"""How far the model's output moves when one decoder layer is sparse: the yardstick of the "divergence"
layer allocation (allocate.layer_targets).

For every layer and a few weighted sparsities along its greedy path, that layer runs at the sparsity while
all others stay dense, and the mean KL divergence of the next-token distributions from the dense model's
is measured on the last positions of the greedy-search sequences. Unlike a block's own output error, this
counts what the rest of the model does with the error. Layers go to the compute device one at a time, as
in the calibration; cost: about layers^2 / 2 x points layer passes over the greedy sequences.
"""

import torch
import torch.nn.functional as F

from .allocate import LayerCalibration, apply_thresholds, clear_thresholds
from .layers import DecoderLayers, capture_layer_inputs, layer_outputs


def _log_probs(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities from final hidden states, on the device of the model's head (Gemma 2's
    logit soft-capping included)."""
    logits = model.lm_head(model.model.norm(hidden.to(model.lm_head.weight.device))).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.log_softmax(logits, dim=-1)


@torch.no_grad()
def output_divergences(model, family, layers: list[LayerCalibration], input_ids: torch.Tensor, shares: dict,
                       points: list[float], settings, decoder_layers=None) -> list[list[float]]:
    """KL(dense || layer l sparse at points[k]) for every layer l and point k, on `input_ids`; the layers come
    from `decoder_layers` (the model's own by default)."""
    device = settings.device
    decoder_layers = decoder_layers or DecoderLayers(model)
    hidden, layer_kwargs = capture_layer_inputs(model, input_ids, device)
    tail = int(input_ids.shape[1] * (1 - settings.tail_fraction))

    def run(index, hidden, calibration=None, point=None):
        with decoder_layers.open(index) as layer:
            layer.to(device)
            if calibration is not None:
                apply_thresholds(layer, family, calibration.thresholds_for(calibration.sparsities_at(point, shares)),
                                 settings.norm_scored)
            hidden = layer_outputs(layer, hidden, layer_kwargs[index], device, settings.micro_batch)
            clear_thresholds(layer, family)
            layer.to("cpu")
        return hidden

    inputs = []  # each layer's dense input
    for index in range(len(decoder_layers)):
        inputs.append(hidden)
        hidden = run(index, hidden)
    head = (model.model.norm, model.lm_head)
    for module in head:  # on the device for the whole measurement, not once per forward
        module.to(device)
    try:
        reference = _log_probs(model, hidden[:, tail:])
        curves = []
        for index, calibration in enumerate(layers):
            curve = []
            for point in points:
                final = run(index, inputs[index], calibration, point)
                for later in range(index + 1, len(decoder_layers)):
                    final = run(later, final)
                log_probs = _log_probs(model, final[:, tail:])
                curve.append((reference.exp() * (reference - log_probs)).sum(-1).mean().item())
            curves.append(curve)
    finally:
        for module in head:
            module.to("cpu")
    return curves
