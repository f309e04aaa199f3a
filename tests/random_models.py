"""Small random models of every supported family, built from configs (no downloads)."""

import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Phi3Config, Phi3ForCausalLM,
    Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

COMMON = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=120, max_position_embeddings=128,
)
FAMILY_MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 8}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),  # per-head q/k norms
    "phi3": (Phi3Config, Phi3ForCausalLM, {"pad_token_id": 0}),  # fused qkv_proj and gate_up_proj
}


def random_model(family: str, seed: int = 0, dtype=torch.float32):
    """A random model whose norm weights and biases are not trivial, so folding them is tested."""
    config_cls, model_cls, extra = FAMILY_MODELS[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**COMMON, **extra)).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
    return model
