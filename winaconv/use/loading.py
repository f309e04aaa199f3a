"""Finding and loading a model for `eval`, `generate` and `bench`.

A winaconv checkpoint is built from the installed `winaconv_runtime` (its model classes read the folder's
config and weights), never from the Python files in the folder: those are only run when they differ from
the installed runtime and the user passed --trust-checkpoint-code (checkpoint/code.py). Everything that can
be checked without loading weights is checked first (config, sparsity tables, code, tensor names and shapes
from the safetensors headers), so a broken checkpoint stops with one line naming what is wrong. A plain
model folder, a .gguf file or a Hub id is loaded dense through transformers, without running remote code
and without pickles.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from winaconv_runtime.checkpoint_format import CheckpointFormatError, SparsitySettings, level_key, section_problems

from .. import sources
from ..errors import WinaconvError
from ..sources import DTYPES

TRUST_FLAG = "--trust-checkpoint-code"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    settings: SparsitySettings | None  # None for a plain model: dense only

    def set_sparsity(self, level: float) -> None:
        if self.settings is not None:
            self.model.set_sparsity(level)
        elif level != 0:
            raise WinaconvError("a plain model has no sparsity levels")


@dataclass
class ModelRef:
    """What to load, found without loading weights: levels are checked and text tokenized first."""

    name: str
    section: dict | None  # the config's winaconv section; None for a plain model
    source: sources.ModelSource
    context: int | None = None  # max_position_embeddings, where the config states it
    config: dict | None = None  # a checkpoint's config.json
    run_folder_code: bool = False  # the folder's own code differs from the runtime and the user opted in

    def available(self) -> list[float]:
        if self.section is None:
            return [0.0]
        return sorted([0.0] + [float(k) for k in self.section.get("levels", {})])


def _checkpoint_config(model: str) -> dict | None:
    """config.json of a local folder with a winaconv section, else None."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        values = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise WinaconvError(f"{config} is not valid JSON ({exc.msg})") from exc
    return values if isinstance(values, dict) and isinstance(values.get("winaconv"), dict) else None


def _context(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def find_model(model: str, trust_checkpoint_code: bool = False) -> ModelRef:
    config = _checkpoint_config(model)
    source = sources.resolve_source(model)
    if config is None:
        sources.check_local_folder(source)  # pickle-only folders are refused, as convert refuses them
        loaded = sources.load_config(source)  # one-line errors for unknown architectures and unreachable models
        return ModelRef(model, None, source, _context(getattr(loaded, "max_position_embeddings", None)))
    return ModelRef(model, config["winaconv"], source, _context(config.get("max_position_embeddings")), config,
                    run_folder_code=check_checkpoint(model, config, trust_checkpoint_code))


def check_checkpoint(model: str, config: dict, trust_checkpoint_code: bool) -> bool:
    """Stops with one line on anything that would make the checkpoint load wrong or fail (from config.json
    and the safetensors headers). Returns whether to run the folder's own code: only when it differs from the
    installed runtime and the user opted in."""
    from ..checkpoint.code import code_problems
    from ..checkpoint.inspection import Inspection, LocalCheckpoint, check_weights

    problems = section_problems(config["winaconv"], config.get("num_hidden_layers"), for_loading=True)
    if problems:
        raise CheckpointFormatError(f"config.json: {problems[0]}")
    folder = LocalCheckpoint(Path(model).expanduser())
    inspection = Inspection(name=model, config=config, section=config["winaconv"])
    check_weights(folder, inspection)
    if inspection.problems:
        more = f" (and {len(inspection.problems) - 1} more: winaconv inspect lists them)" if len(inspection.problems) > 1 else ""
        raise WinaconvError(f"{model} cannot be loaded: {inspection.problems[0]}{more}")
    foreign = code_problems(folder, config)
    if foreign and not trust_checkpoint_code:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise WinaconvError(f"{model}: {foreign[0]}{more}; winaconv runs the installed runtime, not a checkpoint's "
                            f"own code: read the folder's .py files and pass {TRUST_FLAG} to run them")
    return bool(foreign)


def load_tokenizer(ref: ModelRef):
    return sources.load_tokenizer(ref.source, trust_remote_code=ref.run_folder_code)


def resolve_dtype(requested: str, device: str):
    """float32 on CPU unless asked otherwise (bf16 matmuls there are slow and rounding blurs comparisons)."""
    if requested != "auto":
        return DTYPES[requested]
    return torch.float32 if device == "cpu" else "auto"


def installed_class(config: dict):
    """The installed runtime's causal-LM class for a checkpoint's config."""
    from winaconv_runtime.architectures import family_for_model_type
    from winaconv_runtime.checkpoint_format import base_model_type
    from winaconv_runtime.modeling_winaconv import model_class

    return model_class(family_for_model_type(base_model_type(config.get("model_type", ""))),
                       config["winaconv"]["transform"])


def load_model(ref: ModelRef, device: str = "cpu", dtype="auto") -> LoadedModel:
    """A winaconv checkpoint through the installed runtime (or, opted in, the folder's own code), else a plain
    model."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if ref.section is None:
        model = sources.load_model(ref.source, dtype)
    else:
        try:
            if ref.run_folder_code:
                model = AutoModelForCausalLM.from_pretrained(ref.source.location, trust_remote_code=True, dtype=dtype,
                                                             sparsity=0.0)
            else:
                model = installed_class(ref.config).from_pretrained(ref.source.location, dtype=dtype, sparsity=0.0)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a truncated or corrupt shard...
            if type(exc).__name__ == "CheckpointFormatError":  # the folder's code raises its own class
                raise WinaconvError(str(exc)) from None
            raise WinaconvError(f"cannot load {ref.name}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    return LoadedModel(model, model.sparsity_settings if ref.section is not None else None)


def parse_levels(levels, ref: ModelRef) -> list[float]:
    """The levels asked for (every stored one when None), each checked to be stored in the model."""
    available = ref.available()
    if levels is None:
        return available
    wanted = sorted({float(s) for s in levels})
    for level in wanted:
        if not any(level_key(level) == level_key(a) for a in available):
            if ref.section is None:
                raise WinaconvError(
                    f"{ref.name} is a plain model (no winaconv section): only sparsity 0 (dense) can be evaluated"
                )
            stored = ", ".join(f"{s:g}" for s in available)
            raise WinaconvError(f"sparsity {level:g} is not stored in {ref.name}; stored: {stored}")
    return wanted
