"""The `winaconv` section of a checkpoint's config.json: what it holds and how it is read.

Example (thresholds and sparsities are [layer][projection], projections in PROJECTIONS order):

    "winaconv": {
      "format_version": 1,
      "method": "wina",                # or "teal"
      "transform": "global",           # "exact", "global", "pca" or "none"
      "norm_scored": ["q", "k", ...],  # projections whose score is |x_i| * ||W[:, i]||
      "projections": ["q", "k", "v", "o", "gate", "up", "down"],
      "levels": {"0.5": {"thresholds": [[...7 floats...], ...], "sparsities": [[...]]}, ...},
      "default_sparsity": 0.5,
      "calibration": {"source": "...", "tokens": 16384, "seq_len": 512, "seed": 0},
      "base_model": {"id": "...", "revision": null},
      "winaconv_version": "0.1.0"
    }
"""

import math
from dataclasses import dataclass

from .architectures import PROJECTIONS

FORMAT_VERSION = 1
SAFETENSORS_METADATA = {"format": "pt", "winaconv_format_version": str(FORMAT_VERSION)}
METHODS = ("wina", "teal")
TRANSFORMS = ("exact", "global", "pca", "none")


class CheckpointFormatError(ValueError):
    pass


def level_key(sparsity: float) -> str:
    """Stable string key of a sparsity level ("0.5", "0.25")."""
    return f"{round(float(sparsity), 4):g}"


@dataclass
class SparsitySettings:
    method: str
    transform: str
    norm_scored: tuple[str, ...]
    levels: dict[str, dict]
    default_sparsity: float
    num_layers: int

    @classmethod
    def from_config(cls, config) -> "SparsitySettings":
        section = getattr(config, "winaconv", None)
        if not isinstance(section, dict):
            raise CheckpointFormatError("config.json has no 'winaconv' section: not a winaconv checkpoint")
        version = section.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointFormatError(
                f"unknown winaconv format version {version!r}; this runtime reads version {FORMAT_VERSION}"
            )
        if tuple(section.get("projections", ())) != PROJECTIONS:
            raise CheckpointFormatError(f"winaconv projections must be {list(PROJECTIONS)}")
        method, transform = section.get("method"), section.get("transform")
        if method not in METHODS:
            raise CheckpointFormatError(f"unknown winaconv method {method!r}; expected one of {METHODS}")
        if transform not in TRANSFORMS:
            raise CheckpointFormatError(f"unknown winaconv transform {transform!r}; expected one of {TRANSFORMS}")
        settings = cls(
            method=method,
            transform=transform,
            norm_scored=tuple(section.get("norm_scored", ())),
            levels=dict(section.get("levels", {})),
            default_sparsity=float(section.get("default_sparsity", 0.0)),
            num_layers=config.num_hidden_layers,
        )
        for key in settings.levels:
            settings.thresholds(float(key))  # validates every table
        return settings

    def available(self) -> list[float]:
        return sorted([0.0] + [float(k) for k in self.levels])

    def thresholds(self, sparsity: float) -> list[list[float]] | None:
        """Per-layer, per-projection thresholds for a stored level; None for the dense model."""
        if sparsity == 0:
            return None
        key = level_key(sparsity)
        if key not in self.levels:
            stored = ", ".join(f"{s:g}" for s in self.available())
            raise CheckpointFormatError(f"sparsity {sparsity:g} is not stored in this checkpoint; stored: {stored}")
        table = self.levels[key].get("thresholds")
        if (
            not isinstance(table, list)
            or len(table) != self.num_layers
            or any(not isinstance(row, list) or len(row) != len(PROJECTIONS) for row in table)
        ):
            raise CheckpointFormatError(
                f"thresholds of level {key} must be {self.num_layers} layers x {len(PROJECTIONS)} projections"
            )
        if any(not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0 for row in table for t in row):
            raise CheckpointFormatError(f"thresholds of level {key} must be finite and non-negative")
        return table
