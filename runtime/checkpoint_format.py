"""The `winaconv` section of a checkpoint's config.json: what it holds, how it is made, written, checked
and read. The one owner of the section: the converter, `inspect`, the model card and the runtime all
go through here (stdlib only, so it ships in every checkpoint).

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
      "winaconv_version": "0.1.0",
      "conversion_id": "3f1c...",      # also in every shard's safetensors metadata (winaconv_conversion_id)
      "score_max": [[...7 floats...], ...]  # largest gating score calibration saw, [layer][projection]
    }

Format version 2 (mixture-of-experts checkpoints; dense ones stay at 1, so older runtimes keep reading them):
the section adds `"experts": {"count": E, "projections": ["gate", "up", "down"]}`, every level adds
`"expert_thresholds"` [layer][expert][gate, up, down] (the routed experts' thresholds), and a finished
conversion adds `"expert_score_max"` of the same shape. The level's `sparsities` row stays one per projection
kind: gate/up/down give the sparsity every routed expert (and the shared expert) is calibrated at. Its
`thresholds` row holds the shared expert's gate/up/down where the family has one, else 0 (no such matrix).
"""

import json
import math
import struct
from dataclasses import dataclass

from .architectures import PROJECTIONS

FORMAT_VERSION = 1
EXPERTS_FORMAT_VERSION = 2  # a section with routed experts' tables (see above)
READABLE_VERSIONS = (FORMAT_VERSION, EXPERTS_FORMAT_VERSION)
EXPERT_PROJECTIONS = ("gate", "up", "down")
SAFETENSORS_METADATA = {"format": "pt", "winaconv_format_version": str(FORMAT_VERSION)}
METHODS = ("wina", "teal")
TRANSFORMS = ("exact", "global", "pca", "none")


CONVERSION_ID_KEY = "winaconv_conversion_id"  # safetensors metadata: the conversion a shard belongs to
# a threshold may exceed the largest calibration score by float32 rounding of the interpolation, no more
SCORE_MAX_SLACK = 1e-5

EXACT_MODEL_TYPE_PREFIX = "winaconv_exact_"  # exact-transform checkpoints are not a plain model of the family


class CheckpointFormatError(ValueError):
    pass


def exact_model_type(family_name: str) -> str:
    return EXACT_MODEL_TYPE_PREFIX + family_name


def base_model_type(model_type: str) -> str:
    """The family's own model_type for an exact-transform checkpoint's ("winaconv_exact_llama" -> "llama")."""
    return str(model_type).removeprefix(EXACT_MODEL_TYPE_PREFIX)


def is_exact_model_type(model_type: str) -> bool:
    return str(model_type).startswith(EXACT_MODEL_TYPE_PREFIX)


def level_key(sparsity: float) -> str:
    """Stable string key of a sparsity level ("0.5", "0.25")."""
    return f"{round(float(sparsity), 4):g}"


def new_section(method: str, transform: str, norm_scored, winaconv_version: str, experts: int = 0) -> dict:
    """The section of a model with no sparsity levels yet (store_level fills them in after calibration);
    `experts`: the routed experts per layer of a mixture of experts (format version 2)."""
    section = {
        "format_version": EXPERTS_FORMAT_VERSION if experts else FORMAT_VERSION,
        "method": method,
        "transform": transform,
        "norm_scored": list(norm_scored),
        "projections": list(PROJECTIONS),
        "levels": {},
        "default_sparsity": 0.0,
        "winaconv_version": winaconv_version,
    }
    if experts:
        section["experts"] = {"count": int(experts), "projections": list(EXPERT_PROJECTIONS)}
    return section


def store_level(section: dict, sparsity: float, thresholds, sparsities, expert_thresholds=None) -> None:
    """Write one level: thresholds and realised sparsities, [layer][projection] in PROJECTIONS order; with
    experts, the routed experts' thresholds [layer][expert][gate, up, down]."""
    entry = {
        "thresholds": [[float(t) for t in row] for row in thresholds],
        "sparsities": [[round(float(s), 6) for s in row] for row in sparsities],
    }
    if expert_thresholds is not None:
        entry["expert_thresholds"] = [[[float(t) for t in expert] for expert in layer] for layer in expert_thresholds]
    section["levels"][level_key(sparsity)] = entry


def record_norm_scored(section: dict, norm_scored) -> None:
    """Which projections are scored with their column norms (WINA's |x_i| * ||W[:, i]||); the rest by |x_i|."""
    section["norm_scored"] = list(norm_scored)


def record_conversion(section: dict, *, default_sparsity: float, calibration: dict, base_model: dict,
                      conversion_id: str, score_max, expert_score_max=None) -> None:
    """What a finished conversion records beside its levels: the level loaded without sparsity=, how it was
    calibrated, the model it came from, its id (also in every shard) and the largest score per [layer][projection]."""
    section.update(
        default_sparsity=float(default_sparsity),
        calibration=dict(calibration),
        base_model=dict(base_model),
        conversion_id=conversion_id,
        score_max=[[float(s) for s in row] for row in score_max],
    )
    if expert_score_max is not None:
        section["expert_score_max"] = [[[float(s) for s in expert] for expert in layer] for layer in expert_score_max]


def section_problems(section: dict, num_layers, for_loading: bool = False) -> list[str]:
    """Every problem of a section, one line each. for_loading: only what the runtime needs to run it (the
    loader raises the first); otherwise also the metadata a complete checkpoint records (inspect lists all)."""
    problems = []
    version = section.get("format_version")
    if version not in READABLE_VERSIONS:
        problems.append(f"winaconv format_version is {version!r}; this winaconv reads {FORMAT_VERSION} "
                        f"({EXPERTS_FORMAT_VERSION} with mixture-of-experts tables)")
    if section.get("method") not in METHODS:
        problems.append(f"unknown method {section.get('method')!r} (expected one of {', '.join(METHODS)})")
    if section.get("transform") not in TRANSFORMS:
        problems.append(f"unknown transform {section.get('transform')!r} (expected one of {', '.join(TRANSFORMS)})")
    if tuple(section.get("projections") or ()) != PROJECTIONS:
        problems.append(f"projections must be {list(PROJECTIONS)}")
    unknown = set(section.get("norm_scored") or ()) - set(PROJECTIONS)
    if unknown:
        problems.append(f"norm_scored names unknown projections {sorted(unknown)}")
    if not for_loading:
        for key in ("calibration", "base_model", "winaconv_version", "conversion_id", "score_max"):
            if not section.get(key):
                problems.append(f"winaconv section lacks '{key}'")
    if "conversion_id" in section and (not isinstance(section["conversion_id"], str) or not section["conversion_id"]):
        problems.append(f"conversion_id {section['conversion_id']!r} is not a string")
    levels = section.get("levels")
    if not isinstance(levels, dict) or (not levels and not for_loading):
        problems.append("no sparsity levels stored")
        levels = {}
    tables = ("thresholds",) if for_loading else ("thresholds", "sparsities")
    whole = len(problems)
    for key, entry in levels.items():
        level = _float_or_none(key)
        if level is None:
            problems.append(f"level key {key!r} is not a number")
            continue
        if not 0 < level < 1:
            problems.append(f"level {key} is outside (0, 1)")
        if not isinstance(entry, dict):
            problems.append(f"level {key} is not an object")
            continue
        for table_name in tables:
            problems += _table_problems(entry.get(table_name), f"level {key}", table_name, num_layers,
                                        upper=1 if table_name == "sparsities" else None)
    if len(problems) == whole:  # every table is whole: they can be read against each other
        problems += threshold_problems(section, num_layers, by_sparsity=not for_loading)
    problems += expert_problems(section, num_layers, for_loading)
    if not for_loading:
        default = section.get("default_sparsity")
        stored = {_float_or_none(k) for k in levels}
        if not _is_number(default) or (float(default) != 0.0 and float(default) not in stored):
            problems.append(f"default_sparsity {default!r} is neither 0 nor a stored level")
    return problems


def _table_problems(table, where: str, table_name: str, num_layers, upper=None) -> list[str]:
    """A [layer][projection] table of finite numbers in [0, upper] ("level 0.5", "thresholds")."""
    if (not isinstance(table, list) or (isinstance(num_layers, int) and len(table) != num_layers)
            or any(not isinstance(row, list) or len(row) != len(PROJECTIONS) for row in table)):
        return [f"{where} {table_name} must be {num_layers} layers x {len(PROJECTIONS)} projections"]
    value_name = {"thresholds": "threshold", "sparsities": "sparsity"}.get(table_name, table_name)
    problems = []
    for layer, row in enumerate(table):
        for projection, value in zip(PROJECTIONS, row):
            where_value = f"{where} layer {layer} {projection}: {value_name}"
            if not _is_number(value) or not math.isfinite(value):
                problems.append(f"{where_value} {value!r} is not finite")
            elif value < 0 or (upper is not None and value > upper):
                problems.append(f"{where_value} {value!r} is out of range")
    return problems


def expert_count(section: dict) -> int:
    """Routed experts per layer a section's tables hold (0: a dense checkpoint)."""
    experts = section.get("experts")
    return experts.get("count", 0) if isinstance(experts, dict) else 0


def expert_problems(section: dict, num_layers, for_loading: bool) -> list[str]:
    """The version-2 tables: present exactly when the section declares experts, [layer][expert][3] finite
    thresholds >= 0, none above the largest score calibration saw for that expert and projection."""
    experts = section.get("experts")
    if experts is None:
        return []
    count = expert_count(section)
    if section.get("format_version") != EXPERTS_FORMAT_VERSION:
        return [f"experts are declared but format_version is {section.get('format_version')!r}, "
                f"not {EXPERTS_FORMAT_VERSION}"]
    if not (isinstance(count, int) and count > 0) or experts.get("projections") != list(EXPERT_PROJECTIONS):
        return [f"experts must be {{'count': a positive integer, 'projections': {list(EXPERT_PROJECTIONS)}}}"]
    largest = section.get("expert_score_max")
    tables = [("expert_score_max", largest)] if largest is not None or not for_loading else []
    levels = section.get("levels") if isinstance(section.get("levels"), dict) else {}
    tables += [(f"level {key} expert_thresholds", entry.get("expert_thresholds"))
               for key, entry in levels.items() if isinstance(entry, dict)]
    problems = [f"{name} must be {num_layers} layers x {count} experts x 3 finite numbers >= 0"
                for name, table in tables if not _expert_table_ok(table, num_layers, count)]
    if problems or largest is None:
        return problems
    for key, entry in levels.items():
        for layer, (rows, bounds) in enumerate(zip(entry["expert_thresholds"], largest)):
            for expert, (row, bound) in enumerate(zip(rows, bounds)):
                for projection, value, top in zip(EXPERT_PROJECTIONS, row, bound):
                    if value > top * (1 + SCORE_MAX_SLACK):
                        problems.append(f"level {key} layer {layer} expert {expert} {projection}: threshold "
                                        f"{value!r} is above the largest score calibration saw ({top!r})")
    return problems


def _expert_table_ok(table, num_layers, count: int) -> bool:
    layers_ok = isinstance(table, list) and (not isinstance(num_layers, int) or len(table) == num_layers)
    return layers_ok and all(
        isinstance(rows, list) and len(rows) == count and all(
            isinstance(row, list) and len(row) == len(EXPERT_PROJECTIONS)
            and all(_is_number(v) and math.isfinite(v) and v >= 0 for v in row) for row in rows)
        for rows in table)


def threshold_problems(section: dict, num_layers, by_sparsity: bool = True) -> list[str]:
    """Thresholds that calibration cannot have made (a section whose tables are whole). Each (layer,
    projection) has one distribution of scores, and every level's threshold is read off it at that level's
    sparsity: no threshold exceeds the largest score calibration saw (`score_max`, where recorded), above
    which every channel would be dropped, and (by_sparsity) a level storing a higher sparsity never has a
    lower threshold."""
    levels, score_max = section["levels"], section.get("score_max")
    rows = [entry["thresholds"] for entry in levels.values()]
    if score_max is not None:
        problems = _table_problems(score_max, "winaconv", "score_max", len(rows[0]) if rows else num_layers)
        if problems:
            return problems
    problems = []
    for key, entry in levels.items():
        for layer, (row, largest_row) in enumerate(zip(entry["thresholds"], score_max or ())):
            for projection, value, largest in zip(PROJECTIONS, row, largest_row):
                if value > largest * (1 + SCORE_MAX_SLACK):
                    problems.append(f"level {key} layer {layer} {projection}: threshold {value!r} is above the "
                                    f"largest score calibration saw ({largest!r}), so it would drop every channel")
    if by_sparsity:
        problems += _order_problems(levels)
    return problems


def _order_problems(levels: dict) -> list[str]:
    problems = []
    for layer in range(min((len(entry[table]) for entry in levels.values() for table in ("thresholds", "sparsities")),
                           default=0)):
        for index, projection in enumerate(PROJECTIONS):
            points = sorted((entry["sparsities"][layer][index], entry["thresholds"][layer][index], key)
                            for key, entry in levels.items())
            for (s_low, t_low, low), (s_high, t_high, high) in zip(points, points[1:]):
                if s_low < s_high and t_low > t_high:
                    problems.append(f"layer {layer} {projection}: level {low}'s threshold {t_low!r} is above level "
                                    f"{high}'s {t_high!r}, whose sparsity is higher ({s_low:g} < {s_high:g})")
    return problems


def safetensors_metadata(path) -> dict:
    """The `__metadata__` of a safetensors file, from its header alone (8-byte length, then JSON)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(min(length, 100 << 20)))
    return dict(header.get("__metadata__") or {}) if isinstance(header, dict) else {}


def conversion_problems(section: dict, metadata_by_file: dict[str, dict], unmarked_ok: bool = False) -> list[str]:
    """Weight files that belong to another conversion than config.json (a shard copied in from elsewhere).
    A section without a conversion id (made before winaconv recorded one) is not checked here; unmarked_ok
    (loading) lets files without any id pass too: transformers' save_pretrained writes none when a loaded
    checkpoint is saved again."""
    expected = section.get("conversion_id")
    if not expected:
        return []
    return [f"{name} belongs to another conversion (conversion id {meta.get(CONVERSION_ID_KEY)!r} in its metadata, "
            f"{expected!r} in config.json)" for name, meta in metadata_by_file.items()
            if meta.get(CONVERSION_ID_KEY) != expected and not (unmarked_ok and CONVERSION_ID_KEY not in meta)]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _float_or_none(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@dataclass
class SparsitySettings:
    """A loaded checkpoint's section, checked for what the runtime needs."""

    method: str
    transform: str
    norm_scored: tuple[str, ...]
    levels: dict[str, dict]
    default_sparsity: float
    num_layers: int
    experts: int = 0  # routed experts per layer (format version 2), 0 for a dense checkpoint

    @classmethod
    def from_config(cls, config) -> "SparsitySettings":
        section = getattr(config, "winaconv", None)
        if not isinstance(section, dict):
            raise CheckpointFormatError("config.json has no 'winaconv' section: not a winaconv checkpoint")
        problems = section_problems(section, config.num_hidden_layers, for_loading=True)
        if problems:
            raise CheckpointFormatError(f"config.json: {problems[0]}")
        return cls(
            method=section["method"],
            transform=section["transform"],
            norm_scored=tuple(section.get("norm_scored", ())),
            levels=dict(section.get("levels", {})),
            default_sparsity=float(section.get("default_sparsity", 0.0)),
            num_layers=config.num_hidden_layers,
            experts=expert_count(section),
        )

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
        return self.levels[key]["thresholds"]

    def expert_thresholds(self, sparsity: float) -> list[list[list[float]]] | None:
        """[layer][expert][gate, up, down] thresholds of a stored level; None for the dense model."""
        if sparsity == 0:
            return None
        self.thresholds(sparsity)  # the one error for a level not stored
        return self.levels[level_key(sparsity)]["expert_thresholds"]

    def sparsities(self, sparsity: float) -> list[list[float]] | None:
        """Per-layer, per-projection calibrated sparsities of a stored level; None where the checkpoint has no
        well-formed table (they only pick the GPU kernel's kind, so the thresholds alone still load)."""
        if sparsity == 0:
            return None
        table = self.levels[level_key(sparsity)].get("sparsities")
        if table is None or _table_problems(table, "", "sparsities", self.num_layers, upper=1.0):
            return None
        return table
