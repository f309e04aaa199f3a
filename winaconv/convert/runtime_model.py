"""The runtime model of a base model: its config and class, a meta-device skeleton to stream layers into, or a
loaded transformers model moved into the runtime classes without copying its weights."""

import copy

import torch

from winaconv_runtime.architectures import INPUT_ROTATIONS, SHORTCUTS, expert_shape, family_for_model_type
from winaconv_runtime.checkpoint_format import exact_model_type, new_section
from winaconv_runtime.modeling_winaconv import model_class

from .. import __version__


def winaconv_section(method: str, transform: str, norm_scored) -> dict:
    """A new config section (checkpoint_format.new_section) stamped with this winaconv's version."""
    return new_section(method, transform, norm_scored, winaconv_version=__version__)


def runtime_config(base_config, section: dict):
    """The runtime class and config for a base model's config with `section` as its winaconv section."""
    family = family_for_model_type(base_config.model_type)
    cls = model_class(family, section["transform"])
    values = base_config.to_dict()
    for key in ("model_type", "quantization_config", "auto_map", "architectures", "transformers_version"):
        values.pop(key, None)
    values["winaconv"] = copy.deepcopy(section)
    if family.is_moe and "experts" not in section:  # a MoE checkpoint's section holds its experts' tables
        values["winaconv"].update({k: v for k, v in new_section(section["method"], section["transform"], (), "",
                                                                experts=expert_shape(base_config)[0]).items()
                                   if k in ("format_version", "experts")})
    config = cls.config_class.from_dict(values)
    if getattr(base_config, "_attn_implementation", None):
        config._attn_implementation = base_config._attn_implementation
    if section["transform"] == "exact":
        config.model_type = exact_model_type(family.name)
    return cls, config, family


def is_exact_extra(name: str) -> bool:
    """The exact transform's matrices: in the runtime model, never in a source model."""
    return name.endswith(SHORTCUTS + INPUT_ROTATIONS)


def to_runtime_model(base_model, section: dict):
    """A runtime model sharing `base_model`'s tensors, with `section` as its config's winaconv section."""
    cls, config, family = runtime_config(base_model.config, section)
    with torch.device("meta"):
        model = cls(config)
    state = base_model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not is_exact_extra(k)]
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
        model.tie_weights()
    if missing or unexpected:
        raise RuntimeError(f"base model and runtime model disagree: missing {missing}, unexpected {unexpected}")
    _materialize_leftovers(model, base_model)
    return model.eval(), family


def _materialize_leftovers(model, base_model) -> None:
    """The exact transform's matrices start as identity; buffers that are not saved (rotary inv_freq) come from the base."""
    base_buffers = dict(base_model.named_buffers())
    device = next(base_model.parameters()).device
    for name, param in list(model.named_parameters()):
        if param.is_meta:  # only the exact transform's matrices can be left here
            module_name, _, attr = name.rpartition(".")
            eye = torch.eye(param.shape[0], dtype=param.dtype, device=device)
            setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(eye))
    for name, buffer in list(model.named_buffers()):
        if buffer is not None and buffer.is_meta:
            module_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module_name), attr, base_buffers[name])
    for module in model.modules():  # plain attributes some rotary modules keep besides the buffer
        if hasattr(module, "original_inv_freq") and getattr(module.original_inv_freq, "is_meta", False):
            module.original_inv_freq = module.inv_freq.clone()


def skeleton(base_config, section: dict):
    """The runtime model of `base_config` on the meta device, but for the buffers no checkpoint holds
    (rotary tables, embedding scales), computed as from_pretrained computes them."""
    cls, config, _ = runtime_config(base_config, section)
    with torch.device("meta"):
        model = cls(config)
    for module in model.modules():
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)
    return model.eval()
