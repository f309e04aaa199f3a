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
ALL_FAMILIES = sorted(FAMILY_MODELS) + ["gemma2", "gemma3_text"]  # GEMMA_MODELS below


def random_model(family: str, seed: int = 0, dtype=torch.float32):
    """A random model of any supported family whose norm weights and biases are not trivial, so folding
    them is tested."""
    if family in GEMMA_MODELS:
        return _random_gemma(family, seed, dtype)
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


# Gemma 2 / 3 text: output norms, (1 + w) norms, sqrt(hidden) embedding scale, GeGLU, tied embeddings,
# alternating sliding-window (window 4, shorter than the test sequences) and global layers.
_GEMMA_COMMON = dict(
    COMMON, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
)
GEMMA_MODELS = {
    # soft-capping small enough to bite on a random model's scores and logits
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_GEMMA_COMMON, attn_logit_softcapping=2.0,
                                                          final_logit_softcapping=0.5)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_GEMMA_COMMON)),  # per-head q/k norms
}


def _random_gemma(family: str, seed: int, dtype):
    """A random Gemma model whose norm gains (1 + w) are far from 1, so their handling is tested."""
    import transformers

    config_name, model_name, values = GEMMA_MODELS[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(**values)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_name)(config).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(-0.5, 0.5)
    return model
