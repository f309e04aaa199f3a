"""winaconv runtime: load winaconv checkpoints into transformers with sparse linears.

These files are also copied into every checkpoint, so `trust_remote_code=True` needs no install.
The package's names load on first use (PEP 562): importing a light module such as
`winaconv_runtime.architectures` does not pull in torch, transformers and the kernels, which keeps
`winaconv --help` fast.
"""

import importlib

_HOMES = {
    "FAMILIES": "architectures",
    "PROJECTIONS": "architectures",
    "family_for_model_type": "architectures",
    "FORMAT_VERSION": "checkpoint_format",
    "CheckpointFormatError": "checkpoint_format",
    "SparsitySettings": "checkpoint_format",
    "attention_residual": "modeling_winaconv",
    "classes_for": "modeling_winaconv",
    "mlp_residual": "modeling_winaconv",
    "model_class": "modeling_winaconv",
    "sparse_linears": "modeling_winaconv",
    "SparseLinear": "sparse_linear",
}
__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
