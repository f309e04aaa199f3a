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
    )
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
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise UnsupportedArchitecture(f"unsupported architecture '{model_type}'; supported: {supported}")


def projection_sizes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection, derived from a config."""
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    inter = config.intermediate_size
    return {
        "q": (hidden, q_out),
        "k": (hidden, kv_out),
        "v": (hidden, kv_out),
        "o": (q_out, hidden),
        "gate": (hidden, inter),
        "up": (hidden, inter),
        "down": (inter, hidden),
    }


def parameter_shares(config) -> dict[str, float]:
    """Each projection's fraction of a decoder layer's projection weights."""
    sizes = {p: i * o for p, (i, o) in projection_sizes(config).items()}
    total = sum(sizes.values())
    return {p: n / total for p, n in sizes.items()}
