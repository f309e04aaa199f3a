"""The small models of the tests, built from configs (no downloads): a random model of every supported family,
its runtime model with uniform levels stored, and random Llama folders with a tiny BPE tokenizer of their own
(tiny_source), converted once per session where a test needs a checkpoint (tiny_checkpoint)."""

import json
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from budgets import TINY_OPTIONS

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
CONTEXT = COMMON["max_position_embeddings"]  # the tiny models' context (tiny_source's too)
GEMMA_FAMILIES = ["gemma2", "gemma3_text"]  # GEMMA_MODELS below
ALL_FAMILIES = sorted(FAMILY_MODELS) + GEMMA_FAMILIES


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


CALIB_TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the calibration text keeps on going, "
    f"with numbers like {i * 37 % 101} and words such as sparsity, threshold, projection and layer."
    for i in range(60)
)


def tiny_source(root: Path) -> Path:
    """A random Llama (hidden 64, 2 layers) with a small BPE tokenizer, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = root / "tiny-llama"
    if (folder / "config.json").is_file():
        return folder
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([CALIB_TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


_MADE: dict[tuple[Path, str], Path] = {}


def tiny_checkpoint(root: Path, transform: str = "global") -> Path:
    """A converted checkpoint of tiny_source (made once per root and transform); copy it before breaking it."""
    from winaconv.convert import ConvertOptions, convert

    if (root, transform) not in _MADE:
        calib = root / "calib.txt"
        calib.write_text(CALIB_TEXT)
        out = root / f"ckpt-{transform}"
        convert(ConvertOptions(model=str(tiny_source(root)), out=out, method="wina", transform=transform,
                               calib_file=str(calib), device="cpu", **TINY_OPTIONS), say=lambda m: None)
        config = json.loads((out / "config.json").read_text())
        config["winaconv"]["base_model"]["id"] = "example-org/tiny-llama"  # as a Hub-converted model records it
        (out / "config.json").write_text(json.dumps(config, indent=2))
        _MADE[root, transform] = out
    return _MADE[root, transform]


def runtime_with_levels(base, method: str = "teal", levels=(), norm_scored=(), transform: str = "none",
                        first_token: int = 3):
    """(the runtime model of `base`, its family) with uniform levels stored: TEAL's rule, each projection's own
    quantile of its scores on two random sequences of 24 tokens (ids from `first_token` up)."""
    from winaconv.convert.calibrate import uniform_levels
    from winaconv.convert.runtime_model import to_runtime_model, winaconv_section

    model, family = to_runtime_model(base, winaconv_section(method, transform, norm_scored))
    if levels:
        ids = torch.randint(first_token, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
        uniform_levels(model, family, ids, list(levels), norm_scored)
    return model, family


def runtime_llama(silence_attention: bool):
    """The runtime model of the random Llama (TEAL, no transform); with silence_attention its attention adds
    nothing to the residual stream."""
    import copy

    from winaconv.convert.runtime_model import to_runtime_model, winaconv_section

    base = random_model("llama")
    if silence_attention:
        with torch.no_grad():
            for layer in base.model.layers:
                layer.self_attn.o_proj.weight.zero_()  # attention adds nothing to the residual stream
    model, family = to_runtime_model(copy.deepcopy(base), winaconv_section("teal", "none", ()))
    return model, family


def calibration_ids(config, seed=2):
    """Three random sequences of 16 tokens: enough for the pca basis of a tiny model."""
    return torch.randint(0, config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(seed))


def transformed(base, kind):
    """(the runtime model of a copy of `base` with transform `kind` applied, its family)."""
    import copy

    from winaconv.convert.runtime_model import to_runtime_model, winaconv_section
    from winaconv.convert.transform import apply_transform

    model, family = to_runtime_model(copy.deepcopy(base), winaconv_section("wina", kind, ()))
    apply_transform(model, family, kind, calibration_ids=calibration_ids(base.config))
    return model, family


# Mixtures of experts of every supported MoE family (random router and experts of different scales)
MOE_COMMON = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
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

def moe_config(family: str, **overrides):
    import transformers

    config_name, _, values = MOE_MODELS[family]
    return getattr(transformers, config_name)(**{**MOE_COMMON, **values, **overrides})


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


def moe_folder(root: Path, family: str) -> Path:
    """A random MoE of `family` with the tests' small BPE tokenizer (models.tiny_source's), saved as a folder."""
    from transformers import AutoTokenizer

    folder = root / family
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tiny_source(root))
    model = random_moe(family, vocab_size=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (root / "calib.txt").write_text(CALIB_TEXT)
    return folder
