"""Write a winaconv checkpoint folder atomically: everything goes to a temporary sibling folder
that is renamed into place only once complete, so an interrupted run never leaves a folder
that looks finished."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import save_torch_state_dict

import winaconv_runtime
from winaconv_runtime.checkpoint_format import SAFETENSORS_METADATA
from winaconv_runtime.modeling_winaconv import classes_for

from .errors import WinaconvError

RUNTIME_DIR = Path(winaconv_runtime.__file__).parent


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise WinaconvError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise WinaconvError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")


def runtime_files() -> list[Path]:
    return sorted(p for p in RUNTIME_DIR.glob("*.py") if p.name != "__init__.py")


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool):
    """Yields a temporary folder; on success it replaces `out`, on failure it is removed."""
    out = out.resolve()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, previous)
    os.replace(staging, out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def write_checkpoint(model, family, tokenizer, folder: Path, max_shard_size: str = "5GB") -> None:
    """Weights (safetensors, sharded with an index above max_shard_size), config with auto_map,
    tokenizer, generation config and the runtime's source files."""
    config = model.config
    transform = config.winaconv["transform"]
    config.auto_map = classes_for(family, transform)
    config.architectures = [config.auto_map["AutoModelForCausalLM"].split(".", 1)[1]]
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata=dict(SAFETENSORS_METADATA))
    for source in runtime_files():
        shutil.copyfile(source, folder / source.name)
    if not any(folder.glob("*.safetensors")):
        raise WinaconvError("no weights were written")
