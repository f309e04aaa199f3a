"""What a SparseLinear needs to know about its shard when transformers runs the model tensor-parallel.

`from_pretrained(..., tp_plan="auto")` under torchrun turns the weight (and bias) of every projection that the
family's `base_model_tp_plan` names into a DTensor and wraps the module's forward with the collectives
(transformers/distributed/tensor_parallel.py). A column-wise linear (q/k/v, gate/up; Phi-3's fused qkv_proj and
gate_up_proj) keeps a slice of the output rows and reads the whole input; a row-wise one (o, down) keeps a slice
of the input channels, and the ranks' partial outputs are summed. Inside the wrapped forward the parameters are
this rank's plain tensors, so the sparse product runs on its shard as on a smaller linear; outside it
(thresholds, weight layouts) they are DTensors, and this module gives the runtime the local view:

- Whole-column norms. WINA scores input channel i with ||W[:, i]||, the norm of the whole column. A column-wise
  shard holds only part of every column, so the ranks add their partial sums of squares with one all_reduce when
  thresholds are first set (at load, or at the first sparse level) and keep the result: switching levels later
  takes no collective. Storing the norms in the checkpoint would spare that all_reduce, but it would change the
  checkpoint format and the conversion of every model for one [segments, in] vector per projection, once.
  A row-wise shard holds whole columns of its own input channels: its norms, and so its thresholds, are that
  slice of the single-process ones, computed alone. The squares are summed in float64 and rounded to float32
  once, sharded or not, so the order of the partial sums never moves a norm, hence a keep decision.
- Which output segments (a fused linear's projections) the rows of a column-wise shard hold.
"""

from dataclasses import dataclass

import torch
from torch import nn

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a torch built without distributed support: nothing is ever sharded
    dist = DTensor = Replicate = Shard = None


class TensorParallelError(ValueError):
    """A model that cannot run tensor-parallel as asked; the message is one line."""


def is_sharded(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor):
    """This rank's part of a parameter (the tensor itself where the model is not sharded)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def set_local(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Give parameter `name` new local storage (another layout of the same values), keeping it a DTensor with the
    same placement where it is one: transformers' wrapped forward hands the module that storage."""
    param = module._parameters[name]
    if not is_sharded(param):
        param.data = tensor
        return
    sharded = DTensor.from_local(tensor, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                 stride=param.stride())
    module._parameters[name] = nn.Parameter(sharded, requires_grad=param.requires_grad)


@dataclass(frozen=True)
class RowShard:
    """The output rows [start, end) of the whole weight that this rank's column-wise shard holds."""
    start: int
    end: int
    group: object  # the process group whose ranks hold the other rows


def row_shard(weight) -> RowShard | None:
    """The rows a column-wise shard holds; None where every column is whole here (not sharded, or row-wise)."""
    if not is_sharded(weight):
        return None
    mesh, placements = weight.device_mesh, weight.placements
    if mesh.ndim != 1 or len(placements) != 1:
        raise TensorParallelError(f"winaconv runs tensor parallelism on a one-dimensional mesh only (got {mesh})")
    placement = placements[0]
    if isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim in (1, -1)):
        return None
    if type(placement) is not Shard or placement.dim != 0:  # e.g. transformers' packed (strided) shards
        raise TensorParallelError(f"winaconv's sparse linears cannot run a weight sharded as {placement}")
    rows, size, rank = weight.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = (rows + size - 1) // size  # rounded up: DTensor shards as torch.chunk does, the last slices shorter
    start = min(rank * chunk, rows)
    end = min(start + chunk, rows)
    if end - start != local(weight).shape[0]:
        raise TensorParallelError(f"rank {rank} holds {local(weight).shape[0]} rows of {rows}, not rows {start}-{end}")
    return RowShard(start, end, mesh.get_group())


def held_segments(segment_sizes, shard: RowShard | None) -> list[tuple[int, int]]:
    """(segment index, rows held here) of every output segment with rows on this rank, in order."""
    if shard is None:
        return list(enumerate(segment_sizes))
    held, start = [], 0
    for index, size in enumerate(segment_sizes):
        rows = min(start + size, shard.end) - max(start, shard.start)
        if rows > 0:
            held.append((index, rows))
        start += size
    return held


def column_norms(weight, segment_sizes) -> torch.Tensor:
    """[segments, this rank's input channels] float32: per output segment, the norms of whole weight columns."""
    shard = row_shard(weight)
    rows = local(weight)
    offset = 0 if shard is None else shard.start
    squares = torch.zeros((len(segment_sizes), rows.shape[1]), dtype=torch.float64, device=rows.device)
    start = 0
    for index, size in enumerate(segment_sizes):
        lo, hi = max(start, offset), min(start + size, offset + rows.shape[0])
        if hi > lo:
            squares[index] = rows[lo - offset:hi - offset].double().square().sum(dim=0)
        start += size
    if shard is not None:
        dist.all_reduce(squares, group=shard.group)  # every rank's part of every column
    return squares.sqrt().float()


def unsharded_projections(plan: dict, family) -> list[str]:
    """The family's projection paths that a base model's tp plan ("layers.*.<path>": style) leaves whole."""
    return [path for path, _ in family.linears if f"layers.*.{path}" not in plan]


def check_plan(config, family) -> None:
    """One line, before any weight loads, where a tensor-parallel load would leave projections unsharded."""
    requested = getattr(config, "distributed_config", None)
    if requested is None or not (requested.tp_plan is not None or (requested.tp_size or 1) > 1):
        return
    plan = dict(getattr(config, "base_model_tp_plan", None) or {})
    if isinstance(requested.tp_plan, dict):  # its keys name modules from the causal LM down ("model.layers.*...")
        plan.update({key.removeprefix("model."): style for key, style in requested.tp_plan.items()})
    missing = unsharded_projections(plan, family)
    if missing:
        raise TensorParallelError(
            f"{family.name} has no tensor-parallel plan for its projections ({', '.join(missing)} are not in the "
            f"config's base_model_tp_plan): load it without tp_plan, or name them in DistributedConfig(tp_plan=...)")


def plan_summary(config: dict) -> str:
    """For inspect and the model card: how a checkpoint's projections shard under tp_plan="auto" (from its
    config.json, else its family's plan in transformers), or which ones its plan leaves whole."""
    import transformers

    from .architectures import family_for_model_type
    from .checkpoint_format import base_model_type

    family = family_for_model_type(base_model_type(str(config.get("model_type", ""))))
    plan = config.get("base_model_tp_plan")
    if plan is None:
        plan = getattr(transformers, f"{family.base_model_prefix or family.class_prefix}Config").base_model_tp_plan
    plan = plan or {}
    missing = unsharded_projections(plan, family)
    if missing:
        return f"no: the tensor-parallel plan leaves {', '.join(missing)} whole"
    by_style = {}
    for path, _ in family.linears:
        by_style.setdefault(plan[f"layers.*.{path}"], []).append(path.rsplit(".", 1)[-1])
    return 'yes (torchrun, tp_plan="auto"): ' + "; ".join(f"{', '.join(names)} {style}" for style, names in by_style.items())
