"""Greedy decoding at a fixed batch size and cache length, for benchmarks: a thin front of the engine
behind `model.generate()` (runtime/decode_engine.py), so there is one decoding loop. It lives here, not in the
runtime, because checkpoints have no use for it.

    decoder = GreedyDecoder(model, max_length=512)
    ids = decoder.generate(input_ids, max_new_tokens=256)    # [batch, prompt + new] token ids

It never stops early (no end-of-sequence check), which is what a fixed-length timing needs.
"""

import torch
from transformers import GenerationConfig

from winaconv_runtime.decode_engine import DecodeEngine
from winaconv_runtime.sampling import DecodeSettings


class GreedyDecoder:
    def __init__(self, model, max_length: int, batch_size: int = 1, compile: bool | None = None,
                 cuda_graph: bool | None = None, decode_attention: bool | None = None):
        self.engine = DecodeEngine(model, batch_size, max_length, compile=compile, cuda_graph=cuda_graph,
                                   decode_attention=decode_attention)
        self.max_length, self.batch_size = int(max_length), int(batch_size)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        batch, prompt_length = input_ids.shape
        if batch != self.batch_size:
            raise ValueError(f"this decoder was built for batch {self.batch_size}, got {batch}")
        if max_new_tokens < 1 or prompt_length + max_new_tokens > self.max_length:
            raise ValueError(f"prompt {prompt_length} + {max_new_tokens} new tokens must fit max_length {self.max_length}")
        settings = DecodeSettings(GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False), prompt_length, None)
        input_ids = input_ids.to(self.engine.device)
        return self.engine.run(input_ids, torch.ones_like(input_ids), settings)
