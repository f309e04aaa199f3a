"""Resuming an interrupted streamed conversion from its last finished layer.

A streamed conversion keeps in its staging folder, besides the shards it fills, a `.resume` folder: the
fingerprint of the run (source files or revision, the source's config and generation config as loaded,
calibration tokens, every option that changes the output, winaconv, torch and transformers versions), the
global/pca basis, each finished layer's calibration, and the activations
and sampler state the next layer starts from. Each layer's entry is written after its tensors are synced to
disk and is renamed into place, so a kill or a power cut leaves either the old entry or the new one.
The same command run again finds the folder (checkpoint/folder.py's atomic_folder asks this module's
ResumePolicy which one) and starts after the last layer.
"""

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import WinaconvError
from .allocate import LayerCalibration
from .calibrate import CalibrationProgress

RESUME_FOLDER = ".resume"
STATE_FILE = "state.json"
# ConvertOptions fields that do not change the checkpoint's tensors or config (the source and the device are
# fingerprinted on their own; --in-memory reads the same tensors another way)
NOT_FINGERPRINTED = ("out", "overwrite", "model", "revision", "device", "in_memory")
# fields of a loaded config that say where it was read from, not what it is
WHERE_FROM = ("_name_or_path", "transformers_version", "_commit_hash")
LABELS = {"source_config": "the source's config", "source_generation_config": "the source's generation config",
          "source_files": "the source's weight files"}


def digest(values) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def config_digest(config) -> str:
    """sha256 of a transformers config's values (config.json as loaded, defaults filled in)."""
    return digest({k: v for k, v in config.to_dict().items() if k not in WHERE_FROM})


def fingerprint(options, source_id: str, source_files, input_ids: torch.Tensor, device: str, config,
                generation_config) -> dict:
    """Everything a checkpoint depends on: equal fingerprints, equal conversions."""
    import transformers

    from .. import __version__

    settings = {k: v for k, v in asdict(options).items() if k not in NOT_FINGERPRINTED}
    return {
        "source": source_id,
        "source_files": source_files,
        "source_config": config_digest(config),
        "source_generation_config": config_digest(generation_config),
        "calibration_sha256": hashlib.sha256(input_ids.contiguous().numpy().tobytes()).hexdigest(),
        "options": json.loads(json.dumps(settings, default=str)),
        "device_type": device.split(":")[0],  # CPU and GPU round differently
        "winaconv": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def conversion_id(stamp: dict) -> str:
    """The id every shard and the config of a conversion carry: a resumed or repeated run gets the same one."""
    return digest(stamp)[:16]


def differences(old: dict, new: dict) -> list[str]:
    """Names of what differs, for a one-line refusal."""
    names = [LABELS.get(key, key) for key in sorted(set(old) | set(new))
             if key != "options" and old.get(key) != new.get(key)]
    old_options, new_options = old.get("options", {}), new.get("options", {})
    names += [f"--{k.replace('_', '-')}" for k in sorted(set(old_options) | set(new_options))
              if old_options.get(k) != new_options.get(k)]
    return names


def recorded_fingerprint(staging: Path) -> dict | None:
    try:
        return json.loads((staging / RESUME_FOLDER / STATE_FILE).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _replace_atomically(path: Path, write) -> None:
    partial = path.with_name(path.name + ".partial")
    write(partial)
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)


class ResumeJournal:
    def __init__(self, staging: Path, fingerprint: dict):
        self.folder = Path(staging) / RESUME_FOLDER
        self.fingerprint = fingerprint

    def _state(self) -> dict:
        try:
            return json.loads((self.folder / STATE_FILE).read_text())
        except OSError:
            return {"fingerprint": self.fingerprint, "layers": []}

    def _write_state(self, state: dict) -> None:
        self.folder.mkdir(exist_ok=True)
        _replace_atomically(self.folder / STATE_FILE, lambda p: p.write_text(json.dumps(state)))

    def start(self) -> None:
        if not (self.folder / STATE_FILE).is_file():
            self._write_state(self._state())

    def basis(self) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self.folder / "basis.safetensors"
        return load_file(path)["basis"] if path.is_file() else None

    def save_basis(self, basis: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(exist_ok=True)
        _replace_atomically(self.folder / "basis.safetensors",
                            lambda p: save_file({"basis": basis.cpu().contiguous()}, p))

    def progress(self) -> CalibrationProgress | None:
        """What the finished layers left, or None before the first one."""
        from safetensors.torch import load_file

        layers = self._state()["layers"]
        if not layers:
            return None
        calibrations = []
        for index, entry in enumerate(layers):
            grids = load_file(self.folder / f"layer-{index}.safetensors")
            calibrations.append(LayerCalibration(grids=grids, path=entry["path"], errors=entry["errors"],
                                                 seconds=entry["seconds"]))
        carried = load_file(self.folder / "carry.safetensors")
        return CalibrationProgress(calibrations, carried["hidden"], carried["generator_state"])

    def save_layer(self, progress: CalibrationProgress) -> None:
        """After layer len(progress.calibrations) - 1 (its tensors already synced to disk)."""
        from safetensors.torch import save_file

        index = len(progress.calibrations) - 1
        newest = progress.calibrations[-1]
        self.folder.mkdir(exist_ok=True)
        _replace_atomically(self.folder / f"layer-{index}.safetensors",
                            lambda p: save_file({k: v.contiguous() for k, v in newest.grids.items()}, p))
        _replace_atomically(self.folder / "carry.safetensors", lambda p: save_file(
            {"hidden": progress.hidden.cpu().contiguous(), "generator_state": progress.generator_state}, p))
        state = self._state()
        state["layers"] = state["layers"][:index] + [
            {"path": newest.path, "errors": newest.errors, "seconds": newest.seconds}]
        self._write_state(state)

    def finish(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def finished_layers(staging: Path) -> int:
    """How many layers a staging folder's journal records as finished (0 without a readable journal)."""
    try:
        return len(json.loads((staging / RESUME_FOLDER / STATE_FILE).read_text())["layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def is_resumable(staging: Path) -> bool:
    return finished_layers(staging) > 0


class ResumePolicy:
    """What checkpoint/folder.py's atomic_folder asks of a streamed conversion with this fingerprint: which dead
    run's staging folder to go on from, and whether an interrupted one is worth keeping."""

    def __init__(self, fingerprint: dict):
        self.fingerprint = fingerprint

    def claim(self, out: Path, candidates: list[Path], overwrite: bool) -> Path | None:
        """The candidate an interrupted run of this conversion left; one of another conversion is refused in one
        line, and discarded only with --overwrite."""
        for entry in candidates:
            if not is_resumable(entry):
                continue
            recorded = recorded_fingerprint(entry)
            if recorded == self.fingerprint:
                return entry
            if not overwrite:
                changed = ", ".join(differences(recorded or {}, self.fingerprint)) or "the record is unreadable"
                raise WinaconvError(f"an interrupted conversion to {out} with other settings is in {entry.name} "
                                    f"(differs in: {changed}); run its own command to resume it, or pass --overwrite "
                                    "to discard it")
        return None

    def keeps(self, staging: Path) -> bool:
        return is_resumable(staging)

    @staticmethod
    def interrupted_note(staging: Path, total_layers: int) -> str | None:
        """What to tell a user who stopped a conversion that can be resumed."""
        done = finished_layers(staging)
        if not done:
            return None
        return (f"interrupted after {done} of {total_layers} layers; run the same command again to resume from "
                "there (--overwrite with other settings discards it)")
