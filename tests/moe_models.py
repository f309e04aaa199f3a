"""Small random mixtures of experts of every supported MoE family, built from configs (no downloads), and a folder
with a small byte-level BPE tokenizer of their own for conversions."""

from pathlib import Path

import torch

COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=260, max_position_embeddings=128, num_experts_per_tok=2)
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

CALIB_TEXT = "\n\n".join(
    f"Section {i}: routed experts read only the channels they keep, {i * 31 % 97} tokens at a time, while the "
    f"router stays dense and the shared expert adds its gated share to layer {i % 7}."
    for i in range(60)
)


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
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_(0, 0.1)
            elif name.endswith("mlp.gate.weight"):  # the router
                param.normal_(0, 2.0 / param.shape[1] ** 0.5)
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                scale = torch.randn(param.shape[0], 1, 1).mul(expert_spread).exp()
                param.normal_(0, 1.0 / param.shape[2] ** 0.5).mul_(scale.to(param.dtype))
    return model


def moe_folder(root: Path, family: str) -> Path:
    """A random MoE of `family` with a byte-level BPE tokenizer (its vocabulary the model's), saved as a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = root / family
    if (folder / "config.json").is_file():
        return folder
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([CALIB_TEXT], trainers.BpeTrainer(
        vocab_size=COMMON["vocab_size"], special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    model = random_moe(family, vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (root / "calib.txt").write_text(CALIB_TEXT)
    return folder
