"""The Python code a checkpoint folder carries, against the installed winaconv runtime.

Every checkpoint holds copies of the runtime's files so that `from_pretrained(..., trust_remote_code=True)`
works with no install. winaconv itself never runs them: `eval`, `generate` and `bench` build the model from the
installed `winaconv_runtime`. A copy that differs from the installed file, a Python file the runtime does not
have, or an `auto_map` naming anything but the runtime's own classes is code that trust_remote_code would run
and that this winaconv did not write: `inspect` reports it, `push` refuses it, and the commands that load a
model refuse it unless the user passes --trust-checkpoint-code.
"""

import functools
import json
from pathlib import Path

import winaconv_runtime
from winaconv_runtime.architectures import FAMILIES
from winaconv_runtime.checkpoint_format import TRANSFORMS, base_model_type
from winaconv_runtime.modeling_winaconv import classes_for

RUNTIME_DIR = Path(winaconv_runtime.__file__).parent
TOKENIZER_CONFIG = "tokenizer_config.json"


def expected_auto_map(config: dict) -> dict[str, str] | None:
    """The auto_map winaconv writes for this config's family and transform (None if it names neither)."""
    family = FAMILIES.get(base_model_type(str(config.get("model_type", ""))))
    transform = (config.get("winaconv") or {}).get("transform")
    if family is None or transform not in TRANSFORMS:
        return None
    return classes_for(family, transform)


def code_problems(ckpt, config: dict) -> list[str]:
    """One line per piece of code in the checkpoint `ckpt` (a LocalCheckpoint or HubCheckpoint: `files` and
    `read_bytes`) that is not the installed runtime's own."""
    installed = runtime_sources()
    problems = []
    for name in sorted(n for n in ckpt.files if n.endswith(".py") and "/" not in n):
        if name not in installed:
            problems.append(f"{name}: a Python file that is not part of winaconv's runtime")
        elif ckpt.read_bytes(name) != installed[name]:
            problems.append(f"{name}: differs from the installed winaconv runtime's {name}")
    expected = expected_auto_map(config)
    auto_map = config.get("auto_map") or {}
    if expected is not None and isinstance(auto_map, dict):
        for key in sorted(set(auto_map) - set(expected)):
            problems.append(f"config.json: auto_map {key} names {auto_map[key]!r}, which is not winaconv's")
        for key in sorted(set(auto_map) & set(expected)):
            if auto_map[key] != expected[key]:
                problems.append(f"config.json: auto_map {key} names {auto_map[key]!r}, not the runtime's "
                                f"{expected[key]!r}")
    if TOKENIZER_CONFIG in ckpt.files:
        try:
            tokenizer_map = json.loads(ckpt.read_bytes(TOKENIZER_CONFIG)).get("auto_map")
        except (ValueError, AttributeError):
            tokenizer_map = None
        if tokenizer_map:
            problems.append(f"{TOKENIZER_CONFIG}: auto_map names tokenizer code ({json.dumps(tokenizer_map)[:120]}), "
                            "which is not winaconv's")
    return problems


def runtime_files() -> list[Path]:
    return sorted(p for p in RUNTIME_DIR.glob("*.py") if p.name != "__init__.py")


@functools.cache
def runtime_sources() -> dict[str, bytes]:
    """The installed runtime's files as this process first read them: what it copies into checkpoints and
    compares checkpoints' copies with."""
    return {path.name: path.read_bytes() for path in runtime_files()}
