"""The model card (README.md) of a winaconv checkpoint, and the optional results file it reports.

A checkpoint folder may carry `winaconv_results.json`, measured after conversion; every key is optional:

    {
      "perplexity": {"0": 21.37, "0.25": 21.52, "0.5": 22.91},   # sparsity level -> perplexity
      "perplexity_note": "held-out news text, window 512",       # how it was measured (free text)
      "speed": {"0": 9.5, "0.5": 5.2},                           # sparsity level -> decode ms per token
      "speed_note": "H100, bf16, batch 1, static cache + torch.compile"
    }

The JSON that `winaconv eval --json` prints is accepted too (its "results" list gives the perplexities).
"""

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

from winaconv_runtime.architectures import PROJECTIONS, parameter_shares
from winaconv_runtime.checkpoint_format import base_model_type

from ..errors import WinaconvError

RESULTS_FILE = "winaconv_results.json"
CARD_FILE = "README.md"
CARD_MARKER = "<!-- model card written by winaconv: `winaconv push` rewrites it -->"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")

METHOD_TEXT = {
    "wina": "WINA (weight-informed neuron activation): an input channel i of a projection W is kept when "
            "|x_i| * ||W[:, i]||_2 exceeds the projection's threshold",
    "teal": "TEAL: an input channel i of a projection is kept when |x_i| exceeds the projection's threshold",
}
TRANSFORM_TEXT = {
    "exact": "exact per-layer orthogonalizing transform (SVD of k_proj and gate_proj per layer); each layer carries "
             "two hidden x hidden matrices (shortcuts between blocks; on Gemma, rotations of each block's input), so "
             "the weights are not a plain model of the base architecture",
    "global": "one global rotation of the residual stream folded into the weights; the dense weights are a plain "
              "model of the base architecture",
    "pca": "one global rotation of the residual stream, the principal components of its normed activations on the "
           "calibration text, folded into the weights; the dense weights are a plain model of the base architecture",
    "none": "no transform; the dense weights are those of the base model",
}

TEMPLATE = """\
---
{{ card_data }}
---
{{ marker }}

# {{ title }}

Activation-sparse version of {{ base_text }}, converted with winaconv {{ winaconv_version }}.
At decode time each of the seven projections of every decoder layer (q, k, v, o, gate, up, down) skips the input
channels whose score falls under a calibrated threshold, so fewer weight columns are read per token.

- **Method:** {{ method_text }}.
- **Scoring:** {{ scoring }}.
- **Transform:** `{{ transform }}`, {{ transform_text }}.
- **Sparsity levels:** {{ levels_text }} (default {{ default_sparsity }}; 0 is the dense model).
- **Calibration:** {{ calibration_text }}.
- **Checkpoint format:** winaconv format version {{ format_version }}.

## Sparsity levels

Mean sparsity of each projection over the {{ num_layers }} layers, and the parameter-weighted mean of the layer
("overall"), at each stored level:

{{ level_table }}
{% if results_table %}
## Measured results

{{ results_table }}
{% for note in result_notes %}
{{ note }}
{%- endfor %}
{% endif %}
## Usage

The runtime code ships in this repository, so `trust_remote_code=True` is all it needs:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{{ repo_id }}", trust_remote_code=True, sparsity={{ default_sparsity }})
tokenizer = AutoTokenizer.from_pretrained("{{ repo_id }}")
print(model.available_sparsities())  # {{ available }}
model.set_sparsity({{ other_level }})  # switch level at any time; 0 runs the dense model
inputs = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))
```

**Tensor parallelism** (a model larger than one GPU): {{ tensor_parallel }}. Run the lines above under
`torchrun --nproc-per-node N` with `tp_plan="auto"` added to `from_pretrained`: each rank reads only the kept rows
of its own shard, and keeps exactly the channels the single-process model keeps.
{% if plain_loadable %}
Loaded without `trust_remote_code`, the folder is a plain {{ model_type }} model that runs dense.
{% else %}
This checkpoint cannot be loaded without `trust_remote_code=True`: its layers carry the exact transform's extra matrices.
{% endif %}
"""


def is_hub_id(name: str | None) -> bool:
    return bool(name) and HUB_ID.match(name) is not None and ".." not in name


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WinaconvError(f"{path} not found: not a checkpoint folder") from None
    except (OSError, ValueError) as exc:
        raise WinaconvError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(data, dict):
        raise WinaconvError(f"{what} {path} does not hold a JSON object")
    return data


def _level_map(values, what: str) -> dict[float, float]:
    if not isinstance(values, dict):
        raise WinaconvError(f"{RESULTS_FILE}: '{what}' must map sparsity levels to numbers")
    out = {}
    for key, value in values.items():
        try:
            level = float(key)
        except (TypeError, ValueError):
            raise WinaconvError(f"{RESULTS_FILE}: '{what}' key {key!r} is not a sparsity level") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WinaconvError(f"{RESULTS_FILE}: '{what}' value at level {key} is not a finite number")
        out[level] = float(value)
    return out


def parse_results(data: dict) -> dict:
    """The results file, normalised to {"perplexity": {level: float}, "speed": {level: float}, notes...}."""
    results = {"perplexity": {}, "speed": {}, "perplexity_note": None, "speed_note": None}
    if isinstance(data.get("results"), list):  # `winaconv eval --json` output
        try:
            results["perplexity"] = {float(r["sparsity"]): float(r["perplexity"]) for r in data["results"]}
        except (KeyError, TypeError, ValueError):
            raise WinaconvError(f"{RESULTS_FILE}: 'results' entries need 'sparsity' and 'perplexity'") from None
        if data.get("text"):
            results["perplexity_note"] = f"{data['text']}, window {data.get('window')}, stride {data.get('stride')}"
    if "perplexity" in data:
        results["perplexity"] = _level_map(data["perplexity"], "perplexity")
    if "speed" in data:
        results["speed"] = _level_map(data["speed"], "speed")
    for key in ("perplexity_note", "speed_note"):
        if data.get(key) is not None:
            results[key] = str(data[key])
    return results


def load_results(folder: Path) -> dict | None:
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        return None
    return parse_results(read_json(path, "results file"))


def mean_sparsities(section: dict, level: str) -> dict[str, float]:
    rows = section["levels"][level]["sparsities"]
    return {p: sum(row[i] for row in rows) / len(rows) for i, p in enumerate(PROJECTIONS)}


def _shares(config: dict) -> dict[str, float] | None:
    try:
        return parameter_shares(SimpleNamespace(**config))
    except (AttributeError, TypeError, ZeroDivisionError):
        return None


def _fmt_level(level: float) -> str:
    return f"{level:g}"


def level_table(config: dict) -> str:
    section = config["winaconv"]
    shares = _shares(config)
    header = "| level | " + " | ".join(PROJECTIONS) + " | overall |"
    lines = [header, "|" + "---:|" * (len(PROJECTIONS) + 2)]
    for key in sorted(section["levels"], key=float):
        means = mean_sparsities(section, key)
        overall = sum(means[p] * shares[p] for p in PROJECTIONS) if shares else float("nan")
        marker = " (default)" if float(key) == float(section.get("default_sparsity", -1)) else ""
        cells = " | ".join(f"{means[p]:.3f}" for p in PROJECTIONS)
        lines.append(f"| {key}{marker} | {cells} | {overall:.3f} |")
    return "\n".join(lines)


def results_table(results: dict | None) -> tuple[str, list[str]]:
    if not results or not (results["perplexity"] or results["speed"]):
        return "", []
    levels = sorted(set(results["perplexity"]) | set(results["speed"]))
    dense_ms = results["speed"].get(0.0)
    columns = ["sparsity"]
    if results["perplexity"]:
        columns.append("perplexity")
    if results["speed"]:
        columns += ["decode ms/token", "speed-up vs dense"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---:|" * len(columns)]
    for level in levels:
        cells = [_fmt_level(level)]
        if results["perplexity"]:
            ppl = results["perplexity"].get(level)
            cells.append(f"{ppl:.3f}" if ppl is not None else "")
        if results["speed"]:
            ms = results["speed"].get(level)
            cells.append(f"{ms:.2f}" if ms is not None else "")
            cells.append(f"{dense_ms / ms:.2f}x" if ms and dense_ms else "")
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if results.get("perplexity_note"):
        notes.append(f"Perplexity: {results['perplexity_note']}.")
    if results.get("speed_note"):
        notes.append(f"Speed: {results['speed_note']}.")
    return "\n".join(lines), notes


def scoring_text(section: dict) -> str:
    norm_scored = tuple(section.get("norm_scored") or ())
    if section.get("method") == "teal" or not norm_scored:
        return "plain magnitude |x_i| on every projection"
    if set(norm_scored) == set(PROJECTIONS):
        return "column norms on all seven projections (the paper's rule)"
    return f"column norms on {', '.join(norm_scored)} only (the reference code's variant), magnitude elsewhere"


def card_data(config: dict, base_model: str | None = None):
    """ModelCardData: base_model (when it is a Hub id), library, pipeline and tags."""
    from huggingface_hub import ModelCardData

    section = config["winaconv"]
    base = base_model or (section.get("base_model") or {}).get("id")
    method = section.get("method", "wina")
    tags = ["winaconv", method, "activation-sparsity", "sparsity", f"transform-{section.get('transform')}"]
    model_type = base_model_type(config.get("model_type", ""))
    if model_type:
        tags.append(model_type)
    return ModelCardData(
        base_model=base if is_hub_id(base) else None,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )


def build_model_card(folder: Path, repo_id: str | None = None, base_model: str | None = None):
    """The card of the checkpoint in `folder` (config.json and, if present, winaconv_results.json)."""
    from huggingface_hub import ModelCard

    from .inspection import tensor_parallel_support  # (it imports this module)

    folder = Path(folder)
    config = read_json(folder / "config.json", "config")
    section = config.get("winaconv")
    if not isinstance(section, dict) or not isinstance(section.get("levels"), dict):
        raise WinaconvError(f"{folder} has no winaconv section in config.json: not a winaconv checkpoint")
    try:
        table = level_table(config)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise WinaconvError(f"{folder}: malformed sparsity levels in config.json ({exc!r}); run winaconv inspect") from None
    results = load_results(folder)
    results_md, notes = results_table(results)

    base_info = section.get("base_model") or {}
    base = base_model or base_info.get("id")
    revision = base_info.get("revision")
    if is_hub_id(base):
        base_text = f"[{base}](https://huggingface.co/{base})" + (f" (revision `{revision}`)" if revision else "")
    else:
        base_text = f"`{base}`" if base else "an unnamed model"
    calibration = section.get("calibration") or {}
    calibration_text = (
        f"{calibration.get('tokens', '?')} tokens of `{calibration.get('source', '?')}` in sequences of "
        f"{calibration.get('seq_len', '?')}; greedy per-projection allocation on {calibration.get('greedy_tokens', '?')} "
        f"tokens, step {calibration.get('greedy_step', '?')}, seed {calibration.get('seed', '?')}"
    )
    levels = sorted(float(k) for k in section["levels"])
    default = float(section.get("default_sparsity", 0.0))
    others = [level for level in levels if level != default] or levels or [0.0]
    method = section.get("method", "wina")
    transform = section.get("transform", "none")
    repo_id = repo_id or (f"your-name/{folder.name}")
    title = repo_id.split("/")[-1]

    data = card_data(config, base_model)
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        marker=CARD_MARKER,
        title=title,
        base_text=base_text,
        winaconv_version=section.get("winaconv_version", "?"),
        method_text=METHOD_TEXT.get(method, method),
        scoring=scoring_text(section),
        transform=transform,
        transform_text=TRANSFORM_TEXT.get(transform, transform),
        levels_text=", ".join(_fmt_level(level) for level in levels) or "none",
        default_sparsity=_fmt_level(default),
        calibration_text=calibration_text,
        format_version=section.get("format_version"),
        num_layers=config.get("num_hidden_layers", "?"),
        level_table=table,
        results_table=results_md,
        result_notes=notes,
        repo_id=repo_id,
        available=[0.0, *levels],
        other_level=_fmt_level(others[0]),
        tensor_parallel=tensor_parallel_support(config),
        plain_loadable=transform != "exact",
        model_type=config.get("model_type", "base"),
    )


def write_model_card(folder: Path, repo_id: str | None = None, base_model: str | None = None,
                     overwrite_foreign: bool = False) -> tuple[Path, bool]:
    """Write README.md into the checkpoint folder. A README.md that winaconv did not write is kept unless
    overwrite_foreign; returns (path, written)."""
    path = Path(folder) / CARD_FILE
    if path.is_file() and not overwrite_foreign and CARD_MARKER not in path.read_text(errors="replace"):
        return path, False
    from .folder import write_into_checkpoint

    card = build_model_card(folder, repo_id, base_model)
    return write_into_checkpoint(folder, CARD_FILE, str(card)), True
