"""Where a model comes from: a Hub id, a local transformers folder, or a local .gguf file."""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from winaconv_runtime.architectures import UnsupportedArchitecture, family_for_model_type

from .errors import WinaconvError
from .options import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES if name != "auto"}


@dataclass
class ModelSource:
    location: str  # folder or Hub id transformers loads from
    gguf_file: str | None
    model_id: str  # what the checkpoint records as its base model
    revision: str | None

    def load_kwargs(self) -> dict:
        kwargs = {"revision": self.revision} if self.revision else {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        return kwargs


def resolve_source(model: str, revision: str | None = None) -> ModelSource:
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise WinaconvError(f"model file not found: {model}")
        return ModelSource(str(path.parent), path.name, path.name, None)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WinaconvError(f"{model} is a folder but has no config.json: not a transformers model")
        return ModelSource(str(path), None, path.name, None)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise WinaconvError(f"model not found: {model} (expected a Hub id like org/name, a model folder or a .gguf file)")
    return ModelSource(model, None, model, revision)


def resolve_device(requested: str) -> str:
    """--device: auto picks the GPU when there is one; asking for one that is not there is an error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested != "cpu" and not re.fullmatch(r"cuda(:\d+)?", requested):
        raise WinaconvError(f"--device must be auto, cpu, cuda or cuda:N; got {requested!r}")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise WinaconvError(f"--device {requested} asked for, but no CUDA GPU is available")
    if requested.startswith("cuda:") and int(requested[5:]) >= torch.cuda.device_count():
        raise WinaconvError(f"--device {requested}: there are only {torch.cuda.device_count()} CUDA GPU(s)")
    return requested


def check_local_folder(source: ModelSource) -> None:
    """A local folder's config must be JSON and its weights must be there: found before anything loads."""
    folder = Path(source.location)
    if source.gguf_file or not folder.is_dir():
        return
    try:
        json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise WinaconvError(f"{folder / 'config.json'} is not valid JSON: {exc}") from None
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (only pickle files: {', '.join(pickles[:3])}; winaconv loads safetensors only)" if pickles else ""
        raise WinaconvError(f"{folder} has a config.json but no safetensors weights{hint}")


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.location, **source.load_kwargs())
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise WinaconvError(f"cannot load the config of {source.model_id}{hint}: {str(exc).splitlines()[0]}") from exc
    except ValueError as exc:  # transformers' message for a model_type it does not know
        raise WinaconvError(f"unsupported architecture in {source.model_id}: {str(exc).splitlines()[0]}") from exc
    try:
        family_for_model_type(config.model_type)
    except UnsupportedArchitecture as exc:
        raise WinaconvError(str(exc)) from exc
    return config


def load_model(source: ModelSource, dtype: torch.dtype):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **source.load_kwargs())
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or corrupt shard
        raise WinaconvError(f"cannot load the weights of {source.model_id}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """trust_remote_code only for winaconv checkpoints (their config's auto_map names the shipped runtime);
    without it transformers would ask "run the custom code? [y/N]" on stdout."""
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    try:
        return AutoTokenizer.from_pretrained(source.location, **source.load_kwargs(), **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WinaconvError(f"cannot load the tokenizer of {source.model_id}: {first}") from None


def source_dtype(config, requested: str) -> torch.dtype:
    """The dtype to load and save in: --dtype, else the model's own, else float32."""
    if requested != "auto":
        return DTYPES[requested]
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(own, str):
        own = DTYPES.get(own)
    return own if own in DTYPES.values() else torch.float32


def hub_snapshot(source: ModelSource) -> Path:
    """The safetensors files of a Hub model, downloaded into (or found in) the Hub cache; the folder's name is
    the commit it holds."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source.location, revision=source.revision,
                                      allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    except Exception as exc:  # noqa: BLE001: any failure to fetch the weights is one line for the user
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WinaconvError(f"cannot download the weights of {source.model_id}: {first}") from None
