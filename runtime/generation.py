"""`model.generate()` for winaconv checkpoints: transformers' semantics on a static-tensor decode loop.

transformers' own generate spends host work on every token (input preparation, logits
processors, stopping criteria, a host sync), which on a GPU hides any kernel gain. Here a supported call runs
on decode_engine.py's loop (prefill, then one static-tensor step per token, replayed as a CUDA graph on a GPU),
with the token choice of sampling.py.

Supported: greedy and sampling, `max_new_tokens` / `max_length` / `min_new_tokens` / `min_length`,
`repetition_penalty`, one or several `eos_token_id`, `pad_token_id`, left-padded batches, a `streamer`.
Anything else (beam search, assisted decoding, custom logits processors or stopping criteria, scores in
the output...) goes to transformers' own generate with a one-line notice (generation_config.py decides).
"""

import warnings

import torch

from .decode_engine import cached_engine
from .generation_config import GenerationInputError, resolved_config, unsupported_reason
from .sampling import DecodeSettings


class WinaconvGenerationMixin:
    """generate() with transformers' signature: the static-tensor loop, or transformers' own for the rest."""

    @torch.no_grad()
    def generate(self, inputs=None, generation_config=None, streamer=None, **kwargs):
        config, other = resolved_config(self, generation_config, kwargs)
        reason = unsupported_reason(config, other)
        if reason is not None:
            warnings.warn(f"winaconv: {reason} is not supported by the fast generate; using transformers' slower loop", stacklevel=2)
            return super().generate(inputs, generation_config=generation_config, streamer=streamer, **kwargs)
        input_ids = other.pop("input_ids", inputs)
        if input_ids is None:
            raise GenerationInputError("generate() needs input_ids")
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise GenerationInputError(f"input_ids must be [batch, length] with length >= 1 (got shape {tuple(input_ids.shape)})")
        input_ids = input_ids.to(self.device)
        attention_mask = other.get("attention_mask")
        attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device).long())
        if streamer is not None and input_ids.shape[0] > 1:
            raise GenerationInputError("a streamer needs batch size 1")
        context = getattr(self.config, "max_position_embeddings", None)
        settings = DecodeSettings(config, input_ids.shape[1], context)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        engine = cached_engine(self, input_ids.shape[0], input_ids.shape[1] + settings.max_new_tokens)
        try:
            return engine.run(input_ids, attention_mask, settings, streamer)
        finally:
            if streamer is not None:
                streamer.end()
