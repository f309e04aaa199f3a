"""winaconv runtime: load winaconv checkpoints into transformers with sparse linears.

These files are also copied into every checkpoint, so `trust_remote_code=True` needs no install.
"""

from .architectures import FAMILIES, PROJECTIONS, family_for_model_type
from .checkpoint_format import FORMAT_VERSION, CheckpointFormatError, SparsitySettings
from .modeling_winaconv import attention_residual, classes_for, mlp_residual, model_class, sparse_linears
from .sparse_linear import SparseLinear

__all__ = [
    "FAMILIES",
    "FORMAT_VERSION",
    "PROJECTIONS",
    "CheckpointFormatError",
    "SparseLinear",
    "SparsitySettings",
    "attention_residual",
    "classes_for",
    "family_for_model_type",
    "mlp_residual",
    "model_class",
    "sparse_linears",
]
