"""Write a winaconv checkpoint folder atomically: everything goes to a temporary sibling folder
that is renamed into place only once complete, so an interrupted run never leaves a folder
that looks finished.  `--overwrite` only ever replaces a previous winaconv checkpoint."""

import contextlib
import fnmatch
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from safetensors import SafetensorError

from ..errors import WinaconvError
from .code import runtime_sources


# What a winaconv checkpoint folder holds, by name; --overwrite replaces a folder only if it holds nothing
# else. Python files count only if they are this runtime's files or the checkpoint's runtime imports them.
CHECKPOINT_NAMES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                    "model.safetensors.index.json", "winaconv_results.json", "README.md", ".gitattributes",
                    "tokenizer*.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
                    "vocab.txt", "merges.txt", "chat_template.jinja", "chat_template.json", "*.tiktoken")
# hf download --local-dir keeps its bookkeeping in .cache/huggingface; Python writes __pycache__/*.pyc
CHECKPOINT_SUBFOLDERS = {".cache": "huggingface", "__pycache__": "*.pyc"}
STAGING_MARKER = ".winaconv-staging"


def is_winaconv_checkpoint(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("winaconv"), dict)


def runtime_module_names(folder: Path) -> set[str]:
    """The .py files of `folder` that its runtime loads: the modules config.json's auto_map names and,
    transitively, the sibling modules they import (`from .name import ...`)."""
    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    pending = {str(ref).split("--")[-1].split(".")[0] for ref in auto_map.values() if isinstance(ref, str)}
    found = set()
    while pending:
        name = pending.pop()
        path = folder / f"{name}.py"
        if name in found or not path.is_file() or path.is_symlink():
            continue
        found.add(name)
        source = path.read_text(errors="replace")
        pending |= set(re.findall(r"^\s*from \.(\w+) import", source, flags=re.MULTILINE))
    return {f"{name}.py" for name in found}


def _is_checkpoint_entry(entry: Path, runtime_files_here: set[str]) -> bool:
    if entry.is_symlink():
        return False
    if entry.is_dir():
        pattern = CHECKPOINT_SUBFOLDERS.get(entry.name)
        return pattern is not None and all(fnmatch.fnmatch(child.name, pattern) for child in entry.iterdir())
    return entry.is_file() and (entry.name in runtime_files_here
                                or any(fnmatch.fnmatch(entry.name, p) for p in CHECKPOINT_NAMES))


def foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that a winaconv checkpoint does not hold."""
    runtime_files_here = runtime_module_names(folder) | set(runtime_sources())
    return sorted(entry.name for entry in folder.iterdir() if not _is_checkpoint_entry(entry, runtime_files_here))


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(out: Path, overwrite: bool, source: Path | None = None) -> None:
    """Everything about --out that can be known before the model loads. --overwrite only ever replaces a
    previous winaconv checkpoint: never the source model, never a folder with anything else in it."""
    out = Path(out).expanduser().absolute()
    if out.is_symlink():  # replacing it would move the link and write into whatever it points to
        raise WinaconvError(f"--out {out} is a symbolic link (to {os.readlink(out)}); give the folder itself")
    if out.exists() and not out.is_dir():
        raise WinaconvError(f"--out {out} exists and is not a folder")
    ancestor = nearest_existing(out)
    if not ancestor.is_dir():
        raise WinaconvError(f"--out {out} cannot be created: {ancestor} is a file, not a folder")
    if source is not None:
        source, resolved = Path(source).resolve(), out.resolve()
        if resolved == source or resolved in source.parents:
            raise WinaconvError(f"--out {out} is (or contains) the source model {source}; choose another folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise WinaconvError(f"--out {out} exists and is not empty (pass --overwrite to replace a previous "
                                "winaconv checkpoint there)")
        if not is_winaconv_checkpoint(out):
            raise WinaconvError(f"--out {out} is not a winaconv checkpoint (no winaconv section in its "
                                "config.json): --overwrite only replaces one; choose an empty or new folder")
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise WinaconvError(f"--out {out} holds files that are not part of a checkpoint ({shown}): "
                                "--overwrite does not delete them; move them away first")
    parent = nearest_existing(out.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        reason = "is on a read-only file system" if _read_only(parent) else "is not writable"
        raise WinaconvError(f"--out {out} cannot be written: {parent} {reason}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_staging(out: Path) -> list[Path]:
    """Staging folders of `out` that an earlier run left (killed by SIGKILL, a crash, a power cut): only ours
    (marker file inside) and only of processes that are gone."""
    found = []
    for entry in out.parent.glob(f".{glob_escape(out.name)}.*-*"):
        match = re.fullmatch(re.escape(f".{out.name}.") + r"(partial|replaced)-(\d+)(-\w+)?", entry.name)
        if match and entry.is_dir() and (entry / STAGING_MARKER).is_file() and not _pid_alive(int(match.group(2))):
            found.append(entry)
    return sorted(found)


def check_no_live_conversion(out: Path) -> None:
    """A second conversion to the same --out while one runs would race it for the folder: refused up front."""
    out = Path(out).expanduser().absolute()
    for entry in out.parent.glob(f".{glob_escape(out.name)}.partial-*"):
        match = re.fullmatch(re.escape(f".{out.name}.") + r"partial-(\d+)-\w+", entry.name)
        pid = int(match.group(1)) if match else None
        if (pid is not None and pid != os.getpid() and entry.is_dir() and (entry / STAGING_MARKER).is_file()
                and _pid_alive(pid)):
            raise WinaconvError(f"another conversion to {out} is running (process {pid}, staging in {entry.name}); "
                                "wait for it to finish, or choose another --out")


def remove_stale_staging(out: Path, keep: Path | None = None) -> list[Path]:
    """Remove what dead runs left for `out` (but `keep`)."""
    removed = []
    for entry in _dead_staging(out):
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool, source: Path | None = None, resume=None):
    """Yields a temporary folder; on success it replaces `out`, on failure (a write error, SIGINT, SIGTERM)
    it is removed. The folder gets the usual umask-derived mode, not mkdtemp's 0700. With a `resume` policy
    (a streamed conversion: convert/resume.py) it may claim a dead run's folder to go on from, and an
    interrupted folder it `keeps` is left for the next run."""
    out = Path(out).expanduser().absolute()
    check_output_dir(out, overwrite, source)
    check_no_live_conversion(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        resumed = resume.claim(out, _dead_staging(out), overwrite) if resume is not None else None
        remove_stale_staging(out, keep=resumed)
        staging = out.with_name(f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        if resumed is not None:
            os.replace(resumed, staging)  # now this live process's
        else:
            staging.mkdir()
            (staging / STAGING_MARKER).touch()
    except OSError as exc:
        raise WinaconvError(f"cannot create {out}: {exc.strerror or exc}") from None
    try:
        yield staging
        (staging / STAGING_MARKER).unlink()
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as SafetensorError
        shutil.rmtree(staging, ignore_errors=True)
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise WinaconvError(f"writing {out} failed ({reason}); the partial output was removed") from None
    except BaseException:
        if not (resume is not None and resume.keeps(staging)):
            shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _move_into_place(staging, out, overwrite, source)
    except (OSError, WinaconvError) as exc:
        # The checkpoint in staging is complete: keep it where it can be seen, and say where, rather than lose
        # the conversion or leave it in a hidden folder that nothing ever looks at again.
        reason = str(exc) if isinstance(exc, WinaconvError) else f"{type(exc).__name__}: {exc}"
        raise WinaconvError(f"{reason} -- the finished checkpoint was left in {_keep_visible(staging, out)}") from None


def _keep_visible(staging: Path, out: Path) -> Path:
    """A finished checkpoint that could not take --out's place, renamed next to it without the leading dot."""
    kept = out.with_name(f"{out.name}.unplaced-{os.getpid()}")
    try:
        os.rename(staging, kept)  # never onto an existing folder: rename fails on a non-empty one
        return kept
    except OSError:
        return staging


def _move_into_place(staging: Path, out: Path, overwrite: bool, source: Path | None) -> None:
    previous = None
    if out.exists():
        check_output_dir(out, overwrite, source)  # it may have changed during a long conversion
        previous = out.with_name(f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}")
        os.replace(out, previous)
        (previous / STAGING_MARKER).touch()  # a crash before the rmtree below leaves it for the next run
    try:
        os.replace(staging, out)
    except OSError:
        if previous is not None:
            os.replace(previous, out)  # put the old checkpoint back
            (out / STAGING_MARKER).unlink(missing_ok=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def checkpoint_file(folder: Path, name: str) -> Path:
    """The path of a file winaconv may write into an existing checkpoint folder (results, model card): never
    into a folder without a winaconv config (a source model), never through a symbolic link."""
    folder = Path(folder)
    path = folder / name
    if not is_winaconv_checkpoint(folder):
        raise WinaconvError(f"{folder} is not a winaconv checkpoint (no winaconv section in its config.json): "
                            f"{name} is written only into one")
    if path.is_symlink():
        raise WinaconvError(f"{path} is a symbolic link (to {os.readlink(path)}); not writing through it")
    if path.exists() and not path.is_file():
        raise WinaconvError(f"{path} exists and is not a file")
    return path


def write_into_checkpoint(folder: Path, name: str, text: str) -> Path:
    """Write one file into a checkpoint folder (checkpoint_file), replacing it atomically (a temporary sibling
    renamed over it)."""
    path = checkpoint_file(folder, name)
    partial = path.with_name(f".{name}.partial-{os.getpid()}")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise WinaconvError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
