"""Which decoder families winaconv understands, and where their projections live.

A projection is one of the seven matrices WINA sparsifies. Some families fuse several
projections into one nn.Linear (Phi-3: qkv_proj, gate_up_proj); each fused linear is
described as an ordered list of output segments, one per projection.
"""

from dataclasses import dataclass

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
# Projections that write the residual stream (the others read it, through a norm).
RESIDUAL_WRITERS = ("o", "down")
ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
# Projections that read one input (the normed residual stream): one kernel launch can serve them.
SHARED_INPUTS = (("q", "k", "v"), ("gate", "up"))
# The exact transform's two hidden x hidden matrices per decoder layer (winaconv/convert/transform.py): shortcuts
# of a residual stream whose basis changes between blocks, or, in families with a norm on each block's
# output (Gemma), rotations applied online to each block's normed input while the stream stays as it is.
SHORTCUTS = ("attn_shortcut", "mlp_shortcut")
INPUT_ROTATIONS = ("attn_input_rotation", "mlp_input_rotation")


@dataclass(frozen=True)
class Family:
    name: str
    class_prefix: str  # transformers' class name prefix, e.g. "Llama" -> LlamaForCausalLM
    model_types: tuple[str, ...]
    linears: tuple[tuple[str, tuple[str, ...]], ...]  # (module path inside a decoder layer, projections)
    module: str = ""  # transformers.models.<module>; the family's name where empty
    base_model_prefix: str = ""  # prefix of the base model and config classes where it differs (Gemma3Text)
    # Transforms that keep this family's function exact; None: all. Gemma puts a norm with a gain on
    # each block's output, which a rotated residual stream cannot absorb (see winaconv/convert/transform.py):
    # only "exact", whose rotations act on the blocks' inputs, keeps its function there.
    transforms: tuple[str, ...] | None = None
    # Gemma layout: block outputs pass through post_attention_layernorm / post_feedforward_layernorm
    # before the residual add, and the MLP reads pre_feedforward_layernorm.
    output_norms: bool = False
    # Mixture of experts (docs/moe.md): the config key of one routed expert's width; empty for dense families.
    # Their gate/up/down knobs act on the routed experts (one 3D experts module per layer at mlp.experts) and, where
    # `linears` names one, on the shared expert.
    expert_width: str = ""

    @property
    def is_moe(self) -> bool:
        return bool(self.expert_width)

    @property
    def exact_matrices(self) -> tuple[str, str]:
        """Names of the exact transform's (attention, MLP) matrices in this family's decoder layers."""
        return INPUT_ROTATIONS if self.output_norms else SHORTCUTS

    @property
    def modeling_module(self) -> str:
        name = self.module or self.name
        return f"transformers.models.{name}.modeling_{name}"


_SEPARATE = (
    ("self_attn.q_proj", ("q",)),
    ("self_attn.k_proj", ("k",)),
    ("self_attn.v_proj", ("v",)),
    ("self_attn.o_proj", ("o",)),
    ("mlp.gate_proj", ("gate",)),
    ("mlp.up_proj", ("up",)),
    ("mlp.down_proj", ("down",)),
)
_FUSED = (
    ("self_attn.qkv_proj", ("q", "k", "v")),
    ("self_attn.o_proj", ("o",)),
    ("mlp.gate_up_proj", ("gate", "up")),
    ("mlp.down_proj", ("down",)),
)

_ATTENTION = _SEPARATE[:4]
_SHARED_EXPERT = (
    ("mlp.shared_expert.gate_proj", ("gate",)),
    ("mlp.shared_expert.up_proj", ("up",)),
    ("mlp.shared_expert.down_proj", ("down",)),
)
EXPERTS_PATH = "mlp.experts"  # the routed experts of a MoE decoder layer (gate_up_proj [E, 2I, H], down_proj [E, H, I])
EXPERT_PROJECTIONS = ("gate", "up", "down")

FAMILIES = {
    f.name: f
    for f in (
        Family("llama", "Llama", ("llama",), _SEPARATE),
        Family("mistral", "Mistral", ("mistral",), _SEPARATE),
        Family("qwen2", "Qwen2", ("qwen2",), _SEPARATE),
        Family("qwen3", "Qwen3", ("qwen3",), _SEPARATE),
        Family("phi3", "Phi3", ("phi3",), _FUSED),
        Family("gemma2", "Gemma2", ("gemma2",), _SEPARATE, transforms=("none", "exact"), output_norms=True),
        Family("gemma3_text", "Gemma3", ("gemma3_text",), _SEPARATE, module="gemma3", base_model_prefix="Gemma3Text",
               transforms=("none", "exact"), output_norms=True),
        Family("qwen3_moe", "Qwen3Moe", ("qwen3_moe",), _ATTENTION, transforms=("none",),
               expert_width="moe_intermediate_size"),
        Family("qwen2_moe", "Qwen2Moe", ("qwen2_moe",), _ATTENTION + _SHARED_EXPERT, transforms=("none",),
               expert_width="moe_intermediate_size"),
        Family("mixtral", "Mixtral", ("mixtral",), _ATTENTION, transforms=("none",), expert_width="intermediate_size"),
        Family("olmoe", "Olmoe", ("olmoe",), _ATTENTION, transforms=("none",), expert_width="intermediate_size"),
    )
}
# Known families the runtime cannot run yet, with what is missing (one line each).
REFUSED = {
    "gpt_oss": "gpt_oss is not supported: its experts are stored transposed with interleaved gate/up columns, biases "
               "and a clamped gate, which winaconv's expert path (concatenated [E, 2I, H], no bias) does not cover, "
               "and its published weights are MXFP4",
}


def shared_input_paths(family: Family) -> list[tuple[str, ...]]:
    """Module paths of separate linears that read one input (empty where the family fuses them)."""
    groups = []
    for shared in SHARED_INPUTS:
        paths = tuple(path for path, projections in family.linears if set(projections) <= set(shared))
        if len(paths) > 1:
            groups.append(paths)
    return groups


class UnsupportedArchitecture(ValueError):
    pass


def family_for_model_type(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    if model_type in REFUSED:
        raise UnsupportedArchitecture(REFUSED[model_type])
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise UnsupportedArchitecture(f"unsupported architecture '{model_type}'; supported: {supported}")


def expert_shape(config) -> tuple[int, int, int, int]:
    """(experts, experts per token, routed expert width, shared expert width or 0) of a MoE config."""
    experts = getattr(config, "num_experts", None) or config.num_local_experts
    shared = getattr(config, "shared_expert_intermediate_size", None) or 0
    return experts, config.num_experts_per_tok, _routed_width(config), shared


def projection_sizes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection, derived from a config (of a MoE: of one routed expert's)."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    inter = _routed_width(config) or config.intermediate_size
    return {
        "q": (hidden, q_out),
        "k": (hidden, kv_out),
        "v": (hidden, kv_out),
        "o": (q_out, hidden),
        "gate": (hidden, inter),
        "up": (hidden, inter),
        "down": (inter, hidden),
    }


def _routed_width(config) -> int:
    """One routed expert's width; 0 for a dense family (or a config of no known family)."""
    family = next((f for f in FAMILIES.values() if config.model_type in f.model_types), None)
    return getattr(config, family.expert_width) if family is not None and family.is_moe else 0


def parameter_shares(config) -> dict[str, float]:
    """Each projection's fraction of the weights a decoder layer reads per token. In a MoE layer a token reads
    its top-k routed experts and the shared expert, so gate/up/down count top_k routed matrices plus the shared
    one (the router and the shared expert's 1-wide gate stay dense and are left out)."""
    sizes = {p: i * o for p, (i, o) in projection_sizes(config).items()}
    if _routed_width(config):
        _, top_k, width, shared = expert_shape(config)
        for p in EXPERT_PROJECTIONS:
            sizes[p] = (top_k * width + shared) * config.hidden_size
    total = sum(sizes.values())
    return {p: n / total for p, n in sizes.items()}
