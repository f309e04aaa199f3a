"""What each command can be asked, with its defaults and choices, in one place (torch-free, so the
command line's --help stays fast): the click options read their defaults and choices from here."""

from dataclasses import dataclass, fields
from pathlib import Path

from winaconv_runtime.architectures import PROJECTIONS
from winaconv_runtime.checkpoint_format import METHODS, TRANSFORMS  # noqa: F401 (choices of --method, --transform)

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")  # auto: the model's own (convert), float32 on CPU (eval)
# --scoring: the projections WINA scores with column norms (the rest by |x_i| alone, TEAL's score): all seven
# (the paper), or k and gate only (the reference code, microsoft/wina)
NORM_SCORED = {"paper": PROJECTIONS, "reference": ("k", "gate")}
SCORINGS = tuple(NORM_SCORED)
NORMS_PREFIX = "norms:"  # a hidden scoring value: "norms:" and a comma list of projections
# every layer at the level, or shares from the layers' block-error curves or from the model's output divergence
LAYER_ALLOCATIONS = ("uniform", "error", "divergence")
UPSTREAMS = ("dense", "sparse")  # what each layer is calibrated on: the dense model's activations, or the sparse one's
# how a routed expert's thresholds come from the scores the router sent it (winaconv/convert/statistics.py)
EXPERT_CALIBRATIONS = ("pooled", "shrink", "own")


@dataclass
class ConvertOptions:
    model: str
    out: Path
    # the defaults of method and scoring follow the cross-text study's rule (benchmarks/cross_text.py,
    # docs/results.md "Across texts"): they change only for a row that beats them beyond the spread across texts
    method: str = "wina"
    scoring: str = "reference"
    transform: str | None = None  # None: the family's default (transform.default_transform)
    sparsity_levels: tuple[float, ...] = (0.25, 0.4, 0.5, 0.65)
    default_sparsity: float | None = None  # None: 0.5 if stored, else the stored level nearest to it
    calib_file: str | None = None
    calib_dataset: str | None = None
    calib_tokens: int = 16384
    seq_len: int = 512
    greedy_tokens: int = 2048
    greedy_step: float = 0.025
    layer_allocation: str = "uniform"
    upstream: str = "dense"
    expert_calibration: str = "pooled"  # mixture-of-experts models only (docs/moe.md)
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    revision: str | None = None
    overwrite: bool = False
    max_shard_size: str = "5GB"
    in_memory: bool = False  # load the whole model with transformers first, instead of layer by layer


@dataclass
class EvalOptions:
    model: str
    text_file: str | None = None  # None: the built-in held-out text (winaconv.eval_text)
    levels: tuple[float, ...] | None = None  # None: every stored level, 0 included
    window: int = 512
    stride: int | None = None  # None: the window (non-overlapping windows)
    max_tokens: int | None = None
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    tasks: tuple[str, ...] = ()
    trust_checkpoint_code: bool = False  # run the checkpoint's own Python files where they differ from the runtime


@dataclass
class GenerateOptions:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9


@dataclass
class BenchOptions:
    new_tokens: int = 128
    prompt_tokens: int = 128
    batch: int = 1


def default(options_class, name: str):
    """A field's default, as click shows it (a tuple of levels as "0.25,0.5")."""
    value = next(f.default for f in fields(options_class) if f.name == name)
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) and value else value


def norm_scored_projections(method: str, scoring: str) -> tuple[str, ...]:
    """The projections a conversion scores with column norms (none for TEAL). Besides the names of --scoring,
    a hidden value "norms:q,k,v" names the projections directly (the cross-text study's per-projection rows;
    the command line does not offer it)."""
    if method == "teal":
        return ()
    if scoring.startswith(NORMS_PREFIX):
        named = tuple(p for p in scoring[len(NORMS_PREFIX):].split(",") if p)
        unknown = [p for p in named if p not in PROJECTIONS]
        if unknown:
            raise ValueError(f"unknown projections in scoring {scoring!r}: {', '.join(unknown)}")
        return named
    return tuple(NORM_SCORED[scoring])


def scoring_name(section: dict | None) -> str | None:
    """The scoring a checkpoint's config section records, by the name --scoring gives it."""
    if section is None:
        return None
    if section.get("method") == "teal":
        return "magnitude"
    norm_scored = tuple(section.get("norm_scored", ()))
    named = [name for name, projections in NORM_SCORED.items() if sorted(norm_scored) == sorted(projections)]
    return named[0] if named else "norms on " + ",".join(norm_scored)
