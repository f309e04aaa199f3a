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


GGUF_MAGIC = b"GGUF"


def resolve_source(model: str, revision: str | None = None) -> ModelSource:
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise WinaconvError(f"model file not found: {model}")
        with open(path, "rb") as handle:
            if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise WinaconvError(f"{model} is not a GGUF file (it does not start with the GGUF magic bytes)")
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
        # trust_remote_code=False: a config whose auto_map names code in the folder is never run, nor asked about
        config = AutoConfig.from_pretrained(source.location, trust_remote_code=False, **source.load_kwargs())
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise WinaconvError(f"cannot load the config of {source.model_id}{hint}: {str(exc).splitlines()[0]}") from exc
    except Exception as exc:  # noqa: BLE001: a GGUF reader fails in many ways on a truncated file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if source.gguf_file and not _unsupported_gguf_architecture(first):
            raise WinaconvError(f"cannot read the GGUF file {source.gguf_file} ({type(exc).__name__}: {first}); "
                                "is it whole?") from None
        if not isinstance(exc, ValueError):
            raise
        # transformers' message for a model_type it does not know
        raise WinaconvError(f"unsupported architecture in {source.model_id}: {first}") from exc
    try:
        family_for_model_type(config.model_type)
    except UnsupportedArchitecture as exc:
        raise WinaconvError(str(exc)) from exc
    return config


def _unsupported_gguf_architecture(message: str) -> bool:
    """transformers' words for a GGUF file it reads but whose architecture it does not convert."""
    return "architecture" in message and "not supported" in message


def load_generation_config(source: ModelSource, config):
    """The source's generation config (generation_config.json of a folder or Hub repo), else the one transformers
    derives from the model config (a GGUF file has none of its own)."""
    from transformers import GenerationConfig

    if not source.gguf_file:
        try:
            return GenerationConfig.from_pretrained(source.location, **source.load_kwargs())
        except OSError:
            pass
        except ValueError as exc:
            raise WinaconvError(f"the generation config of {source.model_id} is invalid: "
                                f"{str(exc).splitlines()[0]}") from None
    return GenerationConfig.from_model_config(config)


def load_model(source: ModelSource, dtype: torch.dtype):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, trust_remote_code=False,
                                                     **source.load_kwargs(), **safetensors_only(source))
    except (OSError, ValueError, SafetensorError) as exc:  # SafetensorError: a truncated or corrupt shard
        raise WinaconvError(f"cannot load the weights of {source.model_id}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model


def safetensors_only(source: ModelSource) -> dict:
    """from_pretrained's option that never falls back to pickle (.bin) weights; GGUF files are read as they are."""
    return {} if source.gguf_file else {"use_safetensors": True}


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False):
    """The tokenizer, never running code from the model's folder unless trust_remote_code (the user's explicit
    opt-in): trust_remote_code=False is passed, so transformers neither runs an auto_map's code nor asks
    "run the custom code? [y/N]" on stdout (for an exact-transform checkpoint it would, for its config class)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code,
                                             **source.load_kwargs())
    except (OSError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WinaconvError(f"cannot load the tokenizer of {source.model_id}: {first}") from None


def source_dtype(config, requested: str) -> torch.dtype:
    """The dtype to load and save in: --dtype, else the model's own, else float32."""
    if requested != "auto":
        return DTYPES[requested]
    own = getattr(config, "dtype", None)  # transformers 5 maps an older config's torch_dtype here
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
