"""What a winaconv checkpoint is, and whether it is whole: config, sparsity tables, runtime files and
every tensor (names, shapes, safetensors metadata), read from the safetensors headers only.

Works on a local folder or on a Hub repo id; for a repo only config.json, the index and the
headers of the weight files are fetched (the headers through HTTP range requests).
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from winaconv_runtime.architectures import PROJECTIONS, FAMILIES
from winaconv_runtime.checkpoint_format import (EXPERTS_FORMAT_VERSION, FORMAT_VERSION, SAFETENSORS_METADATA, TRANSFORMS,
                                                base_model_type, conversion_problems, is_exact_model_type, section_problems)

from ..errors import WinaconvError
from .model_card import RESULTS_FILE, is_hub_id, parse_results

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass
class Header:
    """One safetensors file's header: its metadata and, per tensor, (shape, dtype)."""

    metadata: dict
    tensors: dict[str, tuple[tuple[int, ...], str]]


class LocalCheckpoint:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.name = str(folder)
        self.files = {
            p.relative_to(self.folder).as_posix()
            for p in self.folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.folder).parts)
        }

    def read_text(self, name: str) -> str:
        return (self.folder / name).read_text()

    def read_bytes(self, name: str) -> bytes:
        return (self.folder / name).read_bytes()

    def read_header(self, name: str) -> Header:
        from safetensors import safe_open

        with safe_open(str(self.folder / name), framework="pt") as f:
            tensors = {}
            for key in f.keys():
                piece = f.get_slice(key)
                tensors[key] = (tuple(piece.get_shape()), str(piece.get_dtype()))
            return Header(dict(f.metadata() or {}), tensors)


class HubCheckpoint:
    """A Hub repo: file list from the repo info, small JSON files downloaded, weight headers by range requests."""

    def __init__(self, repo_id: str, revision: str | None = None, token: str | None = None):
        from huggingface_hub import HfApi, constants, snapshot_download

        if constants.HF_HUB_OFFLINE:
            raise WinaconvError(f"cannot inspect Hub repo {repo_id}: HF_HUB_OFFLINE is set (inspect a local folder instead)")
        self.api = HfApi(endpoint=constants.ENDPOINT, token=token)
        self.repo_id, self.revision = repo_id, revision
        self.name = repo_id + (f"@{revision}" if revision else "")
        try:
            info = self.api.repo_info(repo_id, revision=revision, files_metadata=False)
            self.files = {s.rfilename for s in info.siblings or ()}
            self.revision = info.sha or revision
            self.name = f"{repo_id} @ {revision or 'main'}" + (f" (commit {info.sha[:12]})" if info.sha else "")
            self.local = Path(snapshot_download(
                repo_id, revision=self.revision, token=token, endpoint=constants.ENDPOINT,
                allow_patterns=["config.json", "*.safetensors.index.json", RESULTS_FILE, "*.py", "tokenizer_config.json"],
            ))
        except Exception as exc:  # noqa: BLE001: any failure to reach the repo is one line for the user
            raise WinaconvError(f"cannot read Hub repo {repo_id}: {hub_error_line(exc)}") from None

    def read_text(self, name: str) -> str:
        return (self.local / name).read_text()

    def read_bytes(self, name: str) -> bytes:
        return (self.local / name).read_bytes()

    def read_header(self, name: str) -> Header:
        meta = self.api.parse_safetensors_file_metadata(self.repo_id, name, revision=self.revision)
        tensors = {k: (tuple(v.shape), str(v.dtype)) for k, v in meta.tensors.items()}
        return Header(dict(meta.metadata or {}), tensors)


def hub_error_line(exc: Exception) -> str:
    """One line describing a failed Hub call (status code and server message where there is one)."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    server = (getattr(exc, "server_message", None) or "").strip().splitlines()
    detail = server[0] if server else first
    if status == 401:
        return f"401 Unauthorized, {detail} (check the token: HF_TOKEN, `hf auth login` or --token)"
    if status == 403:
        return f"403 Forbidden, {detail} (the token may not write to this namespace)"
    if status == 404:
        return f"404 Not Found, {detail} (no such repo or revision, or no access to it)"
    if status is not None:
        return f"HTTP {status}, {detail}"
    return f"{type(exc).__name__}: {first}"


def open_checkpoint(location: str, revision: str | None = None, token: str | None = None):
    path = Path(location).expanduser()
    if path.is_dir():
        return LocalCheckpoint(path)
    if path.exists():
        raise WinaconvError(f"{location} is a file, not a checkpoint folder")
    if is_hub_id(location) and not location.startswith((".", "/", "~")):
        return HubCheckpoint(location, revision, token)
    raise WinaconvError(f"checkpoint not found: {location} (expected a folder or a Hub repo id like org/name)")


@dataclass
class Inspection:
    name: str
    config: dict | None = None
    section: dict | None = None
    tensors: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    weight_files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def total_bytes(self) -> int:
        sizes = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                 "F8_E4M3": 1, "F8_E5M2": 1}
        return sum(math.prod(shape) * sizes.get(dtype.upper(), 0) for shape, dtype in self.tensors.values())


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]] | None:
    """Tensor names and shapes the runtime model builds from this config (on the meta device, no memory)."""
    import torch

    from winaconv_runtime.modeling_winaconv import model_class

    model_type = str(config.get("model_type", ""))
    family = FAMILIES.get(base_model_type(model_type))
    if family is None:
        return None
    transform = config["winaconv"].get("transform")
    if transform not in TRANSFORMS:
        return None
    cls = model_class(family, transform)
    values = {k: v for k, v in config.items() if k not in ("model_type", "auto_map", "architectures",
                                                           "transformers_version", "quantization_config")}
    # a valid, empty section: the tables are checked separately, and must not stop the shape check
    version = EXPERTS_FORMAT_VERSION if "experts" in config["winaconv"] else FORMAT_VERSION
    values["winaconv"] = {**config["winaconv"], "format_version": version, "projections": list(PROJECTIONS),
                          "method": "wina", "levels": {}, "default_sparsity": 0.0}
    model_config = cls.config_class.from_dict(values)
    with torch.device("meta"):
        model = cls(model_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def tensor_parallel_support(config: dict) -> str:
    """Whether and how the checkpoint shards under torchrun with tp_plan="auto" (inspect's line, the model card's)."""
    from winaconv_runtime.architectures import UnsupportedArchitecture
    from winaconv_runtime.tensor_parallel import plan_summary

    try:
        return plan_summary(config)
    except (UnsupportedArchitecture, AttributeError) as exc:
        return f"unknown ({exc})"


def _shape(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_weights(ckpt, inspection: Inspection) -> None:
    problems = inspection.problems
    files = ckpt.files
    located: dict[str, str] = {}  # tensor -> file it is in
    if INDEX_FILE in files:
        try:
            index = json.loads(ckpt.read_text(INDEX_FILE))
            weight_map = index["weight_map"]
            assert isinstance(weight_map, dict)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{INDEX_FILE}: unreadable ({type(exc).__name__}: {exc})")
            return
        shards = sorted(set(weight_map.values()))
    elif SINGLE_FILE in files:
        weight_map, shards = None, [SINGLE_FILE]
    else:
        problems.append(f"no weights: neither {INDEX_FILE} nor {SINGLE_FILE} is present")
        return
    inspection.weight_files = shards
    metadata_by_file = {}
    for shard in shards:
        if shard not in files:
            problems.append(f"{shard}: listed in {INDEX_FILE} but missing")
            continue
        try:
            header = ckpt.read_header(shard)
        except Exception as exc:  # noqa: BLE001: a broken file is a problem to report, not a crash
            problems.append(f"{shard}: cannot read the safetensors header ({type(exc).__name__}: {str(exc)[:200]})")
            continue
        metadata_by_file[shard] = header.metadata
        version = header.metadata.get("winaconv_format_version")
        if version != SAFETENSORS_METADATA["winaconv_format_version"]:
            problems.append(
                f"{shard}: safetensors metadata winaconv_format_version is {version!r}; expected "
                f"{SAFETENSORS_METADATA['winaconv_format_version']!r}"
            )
        if header.metadata.get("format") != "pt":
            problems.append(f"{shard}: safetensors metadata format is {header.metadata.get('format')!r}; expected 'pt'")
        for name, info in header.tensors.items():
            if name in located:
                problems.append(f"{name}: stored twice ({located[name]} and {shard})")
            located[name] = shard
            inspection.tensors[name] = info
            if weight_map is not None and weight_map.get(name) != shard:
                problems.append(f"{name}: in {shard} but {INDEX_FILE} says {weight_map.get(name)!r}")
    if weight_map is not None:
        for name, shard in weight_map.items():
            if shard in files and name not in located:
                problems.append(f"{name}: listed in {INDEX_FILE} under {shard} but not in that file")
    problems += conversion_problems(inspection.section, metadata_by_file)

    config = inspection.config
    try:
        expected = expected_tensors(config)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"config.json: cannot build the model it describes ({type(exc).__name__}: {str(exc)[:200]})")
        return
    if expected is None:
        problems.append(f"config.json: unsupported model_type {config.get('model_type')!r}")
        return
    for name, shape in expected.items():
        if name not in inspection.tensors:
            if not (weight_map is not None and name in weight_map):  # already reported as missing from its file
                problems.append(f"{name}: missing (the config expects a tensor of shape {_shape(shape)})")
        elif inspection.tensors[name][0] != shape:
            problems.append(
                f"{name}: shape {_shape(inspection.tensors[name][0])} in {located[name]}, "
                f"but the config expects {_shape(shape)}"
            )
    tied_head = config.get("tie_word_embeddings") and "lm_head.weight"
    for name in sorted(set(inspection.tensors) - set(expected) - {tied_head}):
        problems.append(f"{name}: unexpected tensor in {located[name]} (not part of the model the config describes)")


def check_files(ckpt, inspection: Inspection) -> None:
    from .folder import runtime_sources
    from .code import code_problems

    config = inspection.config
    auto_map = config.get("auto_map") or {}
    target = auto_map.get("AutoModelForCausalLM")
    if not target:
        problems = "config.json: no auto_map entry for AutoModelForCausalLM (trust_remote_code cannot find the runtime)"
        inspection.problems.append(problems)
    elif f"{target.split('.')[0]}.py" not in ckpt.files:
        inspection.problems.append(f"config.json: auto_map names {target} but {target.split('.')[0]}.py is missing")
    for name in runtime_sources():
        if name not in ckpt.files:
            inspection.problems.append(f"{name}: runtime file missing (trust_remote_code needs it)")
    inspection.problems += code_problems(ckpt, config)
    if RESULTS_FILE in ckpt.files:
        try:
            parse_results(json.loads(ckpt.read_text(RESULTS_FILE)))
        except (WinaconvError, ValueError, AttributeError) as exc:
            inspection.problems.append(f"{RESULTS_FILE}: {exc}")


def inspect_checkpoint(location: str, revision: str | None = None, token: str | None = None) -> Inspection:
    """Read and validate a checkpoint; problems are collected, never raised (except for an unreachable repo)."""
    ckpt = open_checkpoint(location, revision, token)
    inspection = Inspection(name=ckpt.name)
    if "config.json" not in ckpt.files:
        inspection.problems.append("config.json: missing")
        return inspection
    try:
        config = json.loads(ckpt.read_text("config.json"))
        assert isinstance(config, dict)
    except Exception as exc:  # noqa: BLE001
        inspection.problems.append(f"config.json: unreadable ({type(exc).__name__}: {exc})")
        return inspection
    inspection.config = config
    section = config.get("winaconv")
    if not isinstance(section, dict):
        inspection.problems.append("config.json: no 'winaconv' section (not a winaconv checkpoint)")
        return inspection
    inspection.section = section
    inspection.problems += [f"config.json: {p}" for p in section_problems(section, config.get("num_hidden_layers"))]
    exact_type = is_exact_model_type(config.get("model_type", ""))
    if section.get("transform") in TRANSFORMS and exact_type != (section.get("transform") == "exact"):
        inspection.problems.append(
            f"config.json: model_type {config.get('model_type')!r} does not fit transform {section.get('transform')!r}"
            f" (only the exact transform has a model_type of its own)"
        )
    check_files(ckpt, inspection)
    check_weights(ckpt, inspection)
    return inspection
