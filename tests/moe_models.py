"""Small random mixtures of experts of every supported MoE family, built from configs (no downloads), a folder of
one with the tests' small tokenizer for conversions, and the float64 reference of the routed experts' rule."""

from pathlib import Path

import torch

COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=300, max_position_embeddings=128, num_experts_per_tok=2)
# an odd number of routed experts, top-2; qwen2_moe adds a shared expert with its sigmoid gate
MOE_MODELS = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=5, moe_intermediate_size=48, head_dim=16, norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=5, moe_intermediate_size=48, shared_expert_intermediate_size=80)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=5, intermediate_size=48)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=5, intermediate_size=48)),
}
MOE_FAMILIES = sorted(MOE_MODELS)
ALL_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")

def moe_config(family: str, **overrides):
    import transformers

    config_name, _, values = MOE_MODELS[family]
    return getattr(transformers, config_name)(**{**COMMON, **values, **overrides})


def random_moe(family: str, seed: int = 0, dtype=torch.float32, expert_spread: float = 0.5, **overrides):
    """A random MoE whose router is not flat and whose experts differ in scale (each expert's weights times
    exp(N(0, expert_spread))), so experts see different numbers of tokens and different score ranges; norm
    weights and biases are not trivial."""
    import transformers

    torch.manual_seed(seed)
    model_cls = getattr(transformers, MOE_MODELS[family][1])
    model = model_cls(moe_config(family, **overrides)).to(dtype).eval()
    draws = {"norm": lambda p: p.uniform_(0.5, 1.5), "bias": lambda p: p.normal_(0, 0.1),
             "mlp.gate.weight": lambda p: p.normal_(0, 2.0 / p.shape[1] ** 0.5),  # the router
             "experts.": lambda p: p.normal_(0, 1.0 / p.shape[2] ** 0.5).mul_(
                 torch.randn(p.shape[0], 1, 1).mul(expert_spread).exp().to(p.dtype))}
    with torch.no_grad():
        for name, param in model.named_parameters():
            draw = next((d for key, d in draws.items() if key in name), None)
            if draw is not None:
                draw(param)
    return model


def reference_experts(x, top_k_index, top_k_weights, gate_up, down, tau_gate_up, tau_down, activation,
                      activation_dtype=torch.float64):
    """The rule in float64: each routed expert's masks from its thresholds, then dense products. The activation
    h may be rounded to `activation_dtype` first (the kernel hands it over in the model's dtype)."""
    width = down.shape[-1]
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    tau_gate_up, tau_down = tau_gate_up.double(), tau_down.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(top_k_index.shape[1]):
            e = int(top_k_index[t, slot])
            gate = gate_up[e, :width] @ (x[t] * (x[t].abs() > tau_gate_up[e, 0]))
            up = gate_up[e, width:] @ (x[t] * (x[t].abs() > tau_gate_up[e, 1]))
            h = (activation(gate) * up).to(activation_dtype).double()
            out[t] += float(top_k_weights[t, slot]) * (down[e] @ (h * (h.abs() > tau_down[e])))
    return out


def moe_folder(root: Path, family: str) -> Path:
    """A random MoE of `family` with the tests' small BPE tokenizer (models.tiny_source's), saved as a folder."""
    from transformers import AutoTokenizer

    from models import CALIB_TEXT, tiny_source

    folder = root / family
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tiny_source(root))
    model = random_moe(family, vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (root / "calib.txt").write_text(CALIB_TEXT)
    return folder
