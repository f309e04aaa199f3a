"""transformers model classes for winaconv checkpoints.

Each supported family gets thin subclasses of transformers' own classes (LlamaForCausalLM,
LlamaModel, ...) in which the seven projections of every decoder layer are SparseLinear
modules. Checkpoints of the exact transform also carry two hidden x hidden matrices per layer
(architectures.SHORTCUTS: the residual stream changes basis between blocks; on Gemma
architectures.INPUT_ROTATIONS: each block's normed input is rotated online), so their decoder
layers add those and the checkpoint gets a model_type of its own: it is not a plain model of the family.
"""

import importlib
import json

import torch
import transformers
from torch import nn

from .architectures import (EXPERT_PROJECTIONS, EXPERTS_PATH, FAMILIES, INPUT_ROTATIONS, PROJECTIONS, SHORTCUTS, Family,
                            UnsupportedArchitecture, expert_shape, projection_sizes, shared_input_paths)
from .checkpoint_format import (CheckpointFormatError, SparsitySettings, conversion_problems, exact_model_type,
                                safetensors_metadata)
from .sparse_experts import IMPLEMENTATION as SPARSE_EXPERTS, install as install_sparse_experts, set_expert_thresholds
from .sparse_linear import SharedInputGroup, SparseLinear, announce_path
from .tensor_parallel import check_plan
from .generation import WinaconvGenerationMixin


def _has_output_norms(layer: nn.Module) -> bool:
    return hasattr(layer, "pre_feedforward_layernorm")  # Gemma 2/3: a norm on each block's output


def attention_residual(layer: nn.Module, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
    """Residual stream after the attention block: x @ S_attn + attn(norm(x) @ R_attn) (S, R absent unless
    exact); Gemma adds post_attention_layernorm(attn(...))."""
    normed = _times(layer.input_layernorm(hidden_states), getattr(layer, INPUT_ROTATIONS[0], None))
    attn_out = layer.self_attn(hidden_states=normed, **kwargs)[0]
    if _has_output_norms(layer):
        attn_out = layer.post_attention_layernorm(attn_out)
    return _times(hidden_states, getattr(layer, SHORTCUTS[0], None)) + attn_out


def mlp_residual(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Residual stream after the MLP block (token-wise, so it may run on any subset of tokens)."""
    if _has_output_norms(layer):
        normed = _times(layer.pre_feedforward_layernorm(hidden_states), getattr(layer, INPUT_ROTATIONS[1], None))
        mlp_out = layer.post_feedforward_layernorm(layer.mlp(normed))
    else:
        mlp_out = layer.mlp(layer.post_attention_layernorm(hidden_states))
    return _times(hidden_states, getattr(layer, SHORTCUTS[1], None)) + mlp_out


def _times(hidden_states, matrix):
    return hidden_states if matrix is None else hidden_states @ matrix


def sparse_linears(layer: nn.Module, family: Family):
    """(projections, SparseLinear) of one decoder layer, in the family's order."""
    for path, projections in family.linears:
        yield projections, layer.get_submodule(path)


def _sparsify_layer(layer: nn.Module, family: Family, config) -> list[SharedInputGroup]:
    """Swap the layer's projections for SparseLinear; returns the groups of linears sharing an input."""
    sizes = projection_sizes(config)
    for path, projections in family.linears:
        parent_path, _, name = path.rpartition(".")
        parent = layer.get_submodule(parent_path)
        linear = getattr(parent, name)
        if not isinstance(linear, SparseLinear):
            segments = tuple(sizes[p][1] for p in projections) if len(projections) > 1 else None
            setattr(parent, name, SparseLinear.from_linear(linear, segments))
    return [SharedInputGroup([layer.get_submodule(p) for p in paths]) for paths in shared_input_paths(family)]


def routed_experts(layer: nn.Module, family: Family):
    """The decoder layer's routed experts module (None in a dense family)."""
    return layer.get_submodule(EXPERTS_PATH) if family.is_moe else None


def _sparsify_experts(decoder, family: Family, config, settings: SparsitySettings) -> None:
    """Route every layer's experts through the sparse experts implementation (docs/moe.md)."""
    if not family.is_moe:
        return
    count = expert_shape(config)[0]
    if settings.experts != count:
        raise CheckpointFormatError(f"config.json: a {family.name} checkpoint needs the format-2 experts tables for "
                                    f"{count} experts (it declares {settings.experts})")
    for index, layer in enumerate(decoder.layers):
        experts = getattr(layer.mlp, "experts", None)
        if experts is None:
            raise UnsupportedArchitecture(f"{family.name}: decoder layer {index} has a dense MLP (mlp_only_layers / "
                                          "decoder_sparse_step); winaconv supports MoE models whose every layer "
                                          "routes to experts")
        install_sparse_experts(experts, config)
    config._experts_implementation = SPARSE_EXPERTS


class WinaconvMixin:
    """Sparsity control shared by the causal-LM and the base-model classes."""

    winaconv_family: Family

    def _winaconv_setup(self, decoder) -> None:
        check_plan(self.config, self.winaconv_family)  # from_pretrained(tp_plan=...) builds the model before loading
        self.sparsity_settings = SparsitySettings.from_config(self.config)
        self._shared_input_groups = []
        for layer in decoder.layers:
            self._shared_input_groups += _sparsify_layer(layer, self.winaconv_family, self.config)
        _sparsify_experts(decoder, self.winaconv_family, self.config, self.sparsity_settings)
        self.sparsity = 0.0

    def _apply(self, fn, *args, **kwargs):
        module = super()._apply(fn, *args, **kwargs)
        for group in getattr(self, "_shared_input_groups", ()):
            group.fuse()  # members moved one by one (model.to(...)): store them side by side again
        return module

    def _decoder_layers(self):
        return self.model.layers if hasattr(self, "model") else self.layers

    def set_sparsity(self, sparsity: float) -> None:
        """Switch to a stored sparsity level (0 is the dense model)."""
        table = self.sparsity_settings.thresholds(float(sparsity))
        shares = self.sparsity_settings.sparsities(float(sparsity))
        norm_scored = self.sparsity_settings.norm_scored
        expert_table = self.sparsity_settings.expert_thresholds(float(sparsity)) if self.winaconv_family.is_moe else None
        for layer_idx, layer in enumerate(self._decoder_layers()):
            for projections, linear in sparse_linears(layer, self.winaconv_family):
                if table is None:
                    linear.set_thresholds(None, None)
                else:
                    row = table[layer_idx]
                    linear.set_thresholds(
                        [row[PROJECTIONS.index(p)] for p in projections], [p in norm_scored for p in projections],
                        [shares[layer_idx][PROJECTIONS.index(p)] for p in projections] if shares else None,
                    )
            experts = routed_experts(layer, self.winaconv_family)
            if experts is not None:
                set_expert_thresholds(experts, None if table is None else expert_table[layer_idx],
                                      [p in norm_scored for p in EXPERT_PROJECTIONS])
        self.sparsity = float(sparsity)
        if table is not None:
            announce_path(self.device.type == "cuda")

    def available_sparsities(self) -> list[float]:
        return self.sparsity_settings.available()

    def _init_weights(self, module):
        super()._init_weights(module)
        for name in SHORTCUTS + INPUT_ROTATIONS:
            matrix = getattr(module, name, None)
            if isinstance(matrix, nn.Parameter) and not getattr(matrix, "_is_hf_initialized", False):
                with torch.no_grad():
                    nn.init.eye_(matrix)

    @classmethod
    def from_pretrained(cls, *args, sparsity: float | None = None, **kwargs):
        """transformers' from_pretrained, strict about tensors, then a stored sparsity level is selected."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        ignored = tuple(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ())
        info["unexpected_keys"] = [k for k in info.get("unexpected_keys", ()) if not k.startswith(ignored)]
        problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
        if problems:
            kind, keys = next(iter(problems.items()))
            raise CheckpointFormatError(f"checkpoint tensors do not match the model ({kind}: {', '.join(keys[:5])})")
        location = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        foreign = conversion_problems(model.config.winaconv, _weight_metadata(location, kwargs), unmarked_ok=True)
        if foreign:
            raise CheckpointFormatError(f"{foreign[0]}: the weights and config.json are not of one conversion")
        model.set_sparsity(model.sparsity_settings.default_sparsity if sparsity is None else sparsity)
        return (model, info) if want_info else model


def _weight_metadata(location, kwargs) -> dict[str, dict]:
    """The safetensors metadata of each weight file of a checkpoint from_pretrained has just loaded (a folder,
    or a Hub repo whose files are in the cache by now)."""
    from transformers.utils import cached_file

    hub = {k: kwargs[k] for k in ("cache_dir", "local_files_only", "token", "revision", "subfolder") if kwargs.get(k)}
    index = cached_file(location, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False, **hub)
    if index:
        with open(index) as handle:
            names = sorted(set(json.load(handle)["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    return {name: safetensors_metadata(cached_file(location, name, **hub)) for name in names}


def _family_classes(family_name: str, exact: bool) -> tuple[type, ...]:
    """(Model, ForCausalLM) of a family's winaconv checkpoints, subclassing transformers' own classes;
    with exact, (Config, Model, ForCausalLM) of its exact-transform checkpoints, whose decoder layers
    carry the shortcut matrices and whose config has a model_type of its own."""
    family = FAMILIES[family_name]
    prefix = family.class_prefix
    base_prefix = family.base_model_prefix or prefix  # Gemma3TextConfig / Gemma3TextModel, Gemma3ForCausalLM
    modeling = importlib.import_module(family.modeling_module)
    base_config = getattr(transformers, f"{base_prefix}Config")
    base_causal_lm = getattr(transformers, f"{prefix}ForCausalLM")
    base_model = getattr(transformers, f"{base_prefix}Model")
    base_layer = getattr(modeling, f"{prefix}DecoderLayer")
    name = ("WinaExact" if exact else "Wina") + prefix

    class ShortcutDecoderLayer(base_layer):
        """Decoder layer of the exact transform: x @ S + block(norm(x)) for both blocks; on Gemma
        x + post_norm(block(pre_norm(x) @ R))."""

        def __init__(self, config, layer_idx):
            super().__init__(config, layer_idx)
            for matrix in family.exact_matrices:
                setattr(self, matrix, nn.Parameter(torch.eye(config.hidden_size)))

        def forward(self, hidden_states, **kwargs):
            return mlp_residual(self, attention_residual(self, hidden_states, **kwargs))

    class ExactConfig(base_config):
        model_type = exact_model_type(family.name)

    def upgrade(config, decoder):
        if exact:
            decoder.layers = nn.ModuleList(ShortcutDecoderLayer(config, i) for i in range(config.num_hidden_layers))

    class Model(WinaconvMixin, base_model):
        _keys_to_ignore_on_load_unexpected = ["lm_head."]  # a causal-LM checkpoint loaded as a base model

        def __init__(self, config):
            super().__init__(config)
            upgrade(config, self)
            self._winaconv_setup(self)
            self.post_init()

    class ForCausalLM(WinaconvGenerationMixin, WinaconvMixin, base_causal_lm):
        def __init__(self, config):
            super().__init__(config)
            upgrade(config, self.model)
            self._winaconv_setup(self.model)
            self.post_init()

    for cls in (Model, ForCausalLM):
        cls.config_class = ExactConfig if exact else base_config
        cls.winaconv_family = family
    named = {"Model": Model, "ForCausalLM": ForCausalLM}
    if exact:
        named.update(Config=ExactConfig, DecoderLayer=ShortcutDecoderLayer)
    for suffix, cls in named.items():
        cls.__name__ = cls.__qualname__ = name + suffix
        cls.__module__ = __name__
    return (ExactConfig, Model, ForCausalLM) if exact else (Model, ForCausalLM)


# The classes config.json's auto_map names (classes_for below): plain-layout checkpoints (transforms
# none, global, pca) of every family, and exact-transform checkpoints of the families that accept it.
WinaLlamaModel, WinaLlamaForCausalLM = _family_classes("llama", exact=False)
WinaMistralModel, WinaMistralForCausalLM = _family_classes("mistral", exact=False)
WinaQwen2Model, WinaQwen2ForCausalLM = _family_classes("qwen2", exact=False)
WinaQwen3Model, WinaQwen3ForCausalLM = _family_classes("qwen3", exact=False)
WinaPhi3Model, WinaPhi3ForCausalLM = _family_classes("phi3", exact=False)
WinaGemma2Model, WinaGemma2ForCausalLM = _family_classes("gemma2", exact=False)
WinaGemma3Model, WinaGemma3ForCausalLM = _family_classes("gemma3_text", exact=False)
WinaQwen3MoeModel, WinaQwen3MoeForCausalLM = _family_classes("qwen3_moe", exact=False)
WinaQwen2MoeModel, WinaQwen2MoeForCausalLM = _family_classes("qwen2_moe", exact=False)
WinaMixtralModel, WinaMixtralForCausalLM = _family_classes("mixtral", exact=False)
WinaOlmoeModel, WinaOlmoeForCausalLM = _family_classes("olmoe", exact=False)
WinaExactLlamaConfig, WinaExactLlamaModel, WinaExactLlamaForCausalLM = _family_classes("llama", exact=True)
WinaExactMistralConfig, WinaExactMistralModel, WinaExactMistralForCausalLM = _family_classes("mistral", exact=True)
WinaExactQwen2Config, WinaExactQwen2Model, WinaExactQwen2ForCausalLM = _family_classes("qwen2", exact=True)
WinaExactQwen3Config, WinaExactQwen3Model, WinaExactQwen3ForCausalLM = _family_classes("qwen3", exact=True)
WinaExactPhi3Config, WinaExactPhi3Model, WinaExactPhi3ForCausalLM = _family_classes("phi3", exact=True)
WinaExactGemma2Config, WinaExactGemma2Model, WinaExactGemma2ForCausalLM = _family_classes("gemma2", exact=True)
WinaExactGemma3Config, WinaExactGemma3Model, WinaExactGemma3ForCausalLM = _family_classes("gemma3_text", exact=True)


def classes_for(family: Family, transform: str) -> dict[str, str]:
    """auto_map entries (class names in this module) for a checkpoint of this family and transform."""
    prefix = ("WinaExact" if transform == "exact" else "Wina") + family.class_prefix
    names = {"AutoModel": f"{prefix}Model", "AutoModelForCausalLM": f"{prefix}ForCausalLM"}
    if transform == "exact":
        names["AutoConfig"] = f"{prefix}Config"
    return {auto: f"modeling_winaconv.{name}" for auto, name in names.items()}


def model_class(family: Family, transform: str, causal_lm: bool = True) -> type:
    name = classes_for(family, transform)["AutoModelForCausalLM" if causal_lm else "AutoModel"].split(".", 1)[1]
    cls = globals().get(name)
    if not (isinstance(cls, type) and cls.__name__ == name):
        raise RuntimeError(f"modeling_winaconv defines no class {name} (family {family.name}, transform {transform})")
    return cls
