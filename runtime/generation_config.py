"""Which generate() calls the fast loop runs: transformers' GenerationConfig resolved as its generate resolves it,
and the reason a call needs transformers' own loop instead (beam search, custom processors, scores...)."""

import copy

from transformers import GenerationConfig

# GenerationConfig fields this implementation honours; any other field that differs from its default
# sends the call to transformers' generate.
SUPPORTED_FIELDS = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
    "top_p", "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "use_cache",
    "decoder_start_token_id", "cache_implementation", "compile_config", "return_dict_in_generate",
    "transformers_version", "_from_model_config", "_commit_hash", "generation_kwargs", "output_attentions",
    "output_hidden_states", "output_scores", "output_logits", "num_beams", "num_return_sequences",
}


def _global_defaults() -> dict:
    """transformers' defaults for the fields neither the call nor the model sets (top_k 50, temperature 1, ...);
    max_length stays unset: DecodeSettings gives an unset one transformers' meaning (20 new tokens)."""
    defaults = dict(GenerationConfig._get_default_generation_params())
    defaults.pop("max_length", None)
    return defaults


def _defaults() -> dict:
    config = GenerationConfig()
    config.update(**_global_defaults(), defaults_only=True)
    return config.to_dict()


_DEFAULTS = _defaults()
_FALLBACK_KWARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model",
                    "negative_prompt_ids", "synced_gpus")


class GenerationInputError(ValueError):
    """Bad input to generate(); the message is one line."""


def resolved_config(model, generation_config: GenerationConfig | None, kwargs: dict) -> tuple[GenerationConfig, dict]:
    """The GenerationConfig transformers' generate runs with, in its order: the call's config (or an empty one),
    its unset fields from the model's generation_config, then transformers' global defaults, then the keyword
    arguments; also returns the keywords that are not config fields."""
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    config.update(**model.generation_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**_global_defaults(), defaults_only=True)
    try:
        other = config.update(**kwargs)
        config.validate()
    except ValueError as error:  # transformers' own checks (max_new_tokens > 0, ...), on one line
        raise GenerationInputError(str(error).strip().splitlines()[0]) from None
    return config, other


def unsupported_reason(config: GenerationConfig, kwargs: dict) -> str | None:
    """Why this call needs transformers' generate, or None when the fast loop can run it."""
    for name in _FALLBACK_KWARGS:
        if kwargs.get(name) is not None:
            return name
    if config.num_beams not in (None, 1):
        return "beam search"
    if config.num_return_sequences not in (None, 1):
        return "num_return_sequences"
    for flag in ("return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
                 "output_hidden_states"):
        if getattr(config, flag, False):
            return flag
    for name, value in config.to_dict().items():
        if name not in SUPPORTED_FIELDS and name in _DEFAULTS and value != _DEFAULTS[name]:
            return name
    extra = set(kwargs) - {"input_ids", "attention_mask", "use_cache"}
    if extra:
        return ", ".join(sorted(extra))
    return None
