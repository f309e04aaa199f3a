"""Write a winaconv checkpoint folder atomically: everything goes to a temporary sibling folder
that is renamed into place only once complete, so an interrupted run never leaves a folder
that looks finished.  `--overwrite` only ever replaces a previous winaconv checkpoint."""

import contextlib
import json
import os
import shutil
import signal
import threading
from pathlib import Path

from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.serialization._base import parse_size_to_int
from safetensors.torch import save_file

import winaconv_runtime
from winaconv_runtime.checkpoint_format import SAFETENSORS_METADATA
from winaconv_runtime.modeling_winaconv import classes_for

from .errors import WinaconvError

RUNTIME_DIR = Path(winaconv_runtime.__file__).parent


def is_winaconv_checkpoint(folder: Path) -> bool:
    """A folder winaconv wrote: its config.json carries the `winaconv` section."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("winaconv"), dict)


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Refuse, before any work, every --out that would lose data or could not be written."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise WinaconvError(f"--out {out} exists and is not a folder")
    if source is not None:
        source = Path(source).resolve()
        if out == source or source.is_relative_to(out):
            raise WinaconvError(f"--out {out} would overwrite the source model {source}: choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise WinaconvError(f"--out {out} exists and is not empty (pass --overwrite to replace a previous "
                                f"winaconv checkpoint)")
        if not is_winaconv_checkpoint(out):
            raise WinaconvError(f"--out {out} holds files that are not a winaconv checkpoint; --overwrite only "
                                f"replaces a previous winaconv checkpoint: choose a new or empty folder")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise WinaconvError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WinaconvError(f"--out {out}: {parent} is not writable")


def check_shard_size(max_shard_size: str) -> int:
    try:
        size = parse_size_to_int(str(max_shard_size))
    except (ValueError, TypeError):
        size = 0
    if size <= 0:
        raise WinaconvError(f"--max-shard-size {max_shard_size!r} is not a size such as 5GB or 500MB")
    return size


def runtime_files() -> list[Path]:
    return sorted(p for p in RUNTIME_DIR.glob("*.py") if p.name != "__init__.py")


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def _remove_stale_staging(out: Path) -> None:
    """Staging folders of this output left by a killed run (their process is gone)."""
    for leftover in out.parent.glob(_staging_prefix(out) + "*"):
        pid = leftover.name[len(_staging_prefix(out)):]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """`kill`, `timeout` and job schedulers send SIGTERM: unwind like Ctrl-C so the staging folder goes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool):
    """Yields a temporary folder; on success it replaces `out`, on failure it is removed."""
    out = out.resolve()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    staging = out.with_name(_staging_prefix(out) + str(os.getpid()))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()  # mode from the umask (mkdtemp's 0700 hid checkpoints from other users)
    try:
        with _sigterm_as_interrupt():
            yield staging
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise WinaconvError(f"could not write {out}: {exc.strerror or exc} (nothing was left behind)") from None
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
    write_weights(state, folder, max_shard_size)
    for source in runtime_files():
        shutil.copyfile(source, folder / source.name)
    if not any(folder.glob("*.safetensors")):
        raise WinaconvError("no weights were written")


def write_weights(state: dict, folder: Path, max_shard_size: str) -> None:
    """Safetensors shards, each with winaconv's metadata (huggingface_hub's writer puts custom
    metadata only into an unsharded file), plus transformers' index when there are several."""
    split = split_torch_state_dict_into_shards(state, max_shard_size=check_shard_size(max_shard_size))
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state[name] for name in names}, folder / filename, metadata=dict(SAFETENSORS_METADATA))
    if split.is_sharded:
        index = {"metadata": {**split.metadata, **SAFETENSORS_METADATA}, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
