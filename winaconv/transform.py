"""Orthogonalizing transforms, folded into the weights so the dense model computes the same function.

Row-vector convention: a linear computes y = x W^T with W [out, in]. If the residual stream is
carried in a rotated basis, s = r Q (Q orthogonal), a linear that reads it uses W Q and a linear
that writes it uses Q^T W (bias Q^T b). RMSNorm without a weight commutes with Q, so the norm
weights are first folded into the linears that read them.

- "none":   weights untouched.
- "global": one Q for the whole residual stream (a plain model of the same architecture). Q
            diagonalises the sum of W^T W over every matrix reading the stream, so their columns
            are as close to orthogonal as one basis allows.
- "pca":    one Q for the whole residual stream, like "global", but from the data: the principal
            components of the normed residual stream on the calibration text (as LaRoSA rotates),
            which gathers each token's energy into few channels, what magnitude sparsity wants.
- "exact":  per block, Q = right singular vectors of k_proj (attention) / gate_proj (MLP), so
            those matrices have exactly orthogonal columns (WINA's assumption). The basis changes
            between blocks, so each layer carries two shortcut matrices S = Q_prev^T Q_next.
All arithmetic is float64; results are cast back to the model's dtype.

Gemma 2/3 (families with output norms) accept "none" and "exact". Each block's output passes through
an RMSNorm with a gain g before the residual add, and (y / rms(y)) diag(g) Q cannot come from a rotated
writer: rms is blind to rotations but not to diag(g), and diag(g) Q is orthogonal only when |g| is
constant, so no rotation of the residual stream folds into the weights ("global", "pca" refused).
Their "exact" leaves the stream as it is and rotates each block's normed input online instead
(x -> x Q before q/k/v and before gate/up, whose weights become W Q, with the same per-block Q as
above): two hidden x hidden matrices per layer, as many as the shortcuts on Llama
(benchmarks/gemma_transforms.md: their cost in bytes and accuracy on Gemma 3 270M).
"""

import torch
from torch import nn

from winaconv_runtime.architectures import RESIDUAL_WRITERS, Family, projection_sizes
from winaconv_runtime.checkpoint_format import TRANSFORMS

from .calibrate import residual_covariance
from .errors import WinaconvError


def available_transforms(family: Family) -> tuple[str, ...]:
    return TRANSFORMS if family.transforms is None else family.transforms


def default_transform(family: Family) -> str:
    """pca where rotations fold into the weights (README: Results); Gemma: none, which reads no extra
    bytes per token (benchmarks/gemma_transforms.md)."""
    return "pca" if family.transforms is None else family.transforms[0]


def check_transform(family: Family, kind: str) -> None:
    """One-line error for a transform that would not keep this family's function exact."""
    allowed = available_transforms(family)
    if kind not in allowed:
        raise WinaconvError(
            f"transform '{kind}' is not available for {family.name} (a norm on each block's output does not "
            f"commute with a rotation of the residual stream); available: {', '.join(allowed)}"
        )


def _readers(layer, family: Family, block: str) -> list[nn.Linear]:
    wanted = {"attention": ("q", "k", "v"), "mlp": ("gate", "up")}[block]
    return [layer.get_submodule(path) for path, projs in family.linears if set(projs) <= set(wanted)]


def _writers(layer, family: Family) -> list[nn.Linear]:
    return [layer.get_submodule(path) for path, projs in family.linears if set(projs) <= set(RESIDUAL_WRITERS)]


def _segment(linear: nn.Linear, family: Family, config, projection: str) -> torch.Tensor:
    """Rows of `projection` inside the (possibly fused) linear that holds it, in float64."""
    sizes = projection_sizes(config)
    for path, projs in family.linears:
        if projection in projs:
            start = sum(sizes[p][1] for p in projs[: projs.index(projection)])
            return linear.weight[start : start + sizes[projection][1]].double()
    raise KeyError(projection)


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


def untie_embeddings(model) -> None:
    if model.lm_head.weight is model.get_input_embeddings().weight or model.config.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False


@torch.no_grad()
def fold_norms(model, family: Family) -> None:
    """Multiply every RMSNorm weight into the linears reading its output; set the norms to 1."""
    untie_embeddings(model)
    decoder = model.model

    def fold(norm, linears):
        gain = norm.weight.double()
        for linear in linears:
            _set(linear.weight, linear.weight.double() * gain)
        _set(norm.weight, torch.ones_like(gain))

    for layer in decoder.layers:
        fold(layer.input_layernorm, _readers(layer, family, "attention"))
        fold(layer.post_attention_layernorm, _readers(layer, family, "mlp"))
    fold(decoder.norm, [model.lm_head])


def _principal_basis(gram: torch.Tensor) -> torch.Tensor:
    """Orthogonal Q whose columns are the eigenvectors of a symmetric matrix, largest first."""
    _, vectors = torch.linalg.eigh(gram)
    return vectors.flip(-1)


def _gram(weight: torch.Tensor) -> torch.Tensor:
    return weight.T @ weight


def exact_bases(model, family: Family, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(Q_attn, Q_mlp) per layer: right singular vectors of k_proj and gate_proj."""
    bases = []
    for layer in model.model.layers:
        k = _segment(layer.get_submodule(_path_of(family, "k")), family, model.config, "k")
        gate = _segment(layer.get_submodule(_path_of(family, "gate")), family, model.config, "gate")
        bases.append((_principal_basis(_gram(k.to(device))), _principal_basis(_gram(gate.to(device)))))
    return bases


def _path_of(family: Family, projection: str) -> str:
    return next(path for path, projs in family.linears if projection in projs)


def global_basis(model, family: Family, device) -> torch.Tensor:
    hidden = model.config.hidden_size
    total = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
    for layer in model.model.layers:
        for linear in _readers(layer, family, "attention") + _readers(layer, family, "mlp"):
            w = linear.weight.to(device=device, dtype=torch.float64)
            total += _gram(w) / w.square().sum()
    return _principal_basis(total)


def _read_in(linears, q: torch.Tensor) -> None:
    """Linears that read a stream now carried as x Q: W -> W Q (float64 on Q's device)."""
    for linear in linears:
        _set(linear.weight, linear.weight.to(q.device, torch.float64) @ q)


@torch.no_grad()
def _rotate(model, family: Family, bases: list[tuple[torch.Tensor, torch.Tensor]], final: torch.Tensor) -> None:
    """Apply per-block bases; bases[l] = (Q_attn, Q_mlp) of layer l, `final` read by lm_head."""
    embed = model.get_input_embeddings()
    device = final.device

    def write_in(linear, q):
        _set(linear.weight, q.T @ linear.weight.to(device, torch.float64))
        if linear.bias is not None:
            _set(linear.bias, q.T @ linear.bias.to(device, torch.float64))

    _set(embed.weight, embed.weight.to(device, torch.float64) @ bases[0][0])
    layers = list(model.model.layers)
    for idx, (layer, (q_attn, q_mlp)) in enumerate(zip(layers, bases)):
        q_next = bases[idx + 1][0] if idx + 1 < len(layers) else final
        o_proj, down_proj = _writers(layer, family)
        _read_in(_readers(layer, family, "attention"), q_attn)
        write_in(o_proj, q_mlp)
        _read_in(_readers(layer, family, "mlp"), q_mlp)
        write_in(down_proj, q_next)
        if hasattr(layer, "attn_shortcut"):
            _set(layer.attn_shortcut, q_attn.T @ q_mlp)
            _set(layer.mlp_shortcut, q_mlp.T @ q_next)
    _read_in([model.lm_head], final)


@torch.no_grad()
def _rotate_block_inputs(model, family: Family, bases: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Gemma's exact transform: block inputs rotated online, x -> x Q, and the readers' weights W -> W Q;
    the residual stream, the norms and the tied embeddings stay as they are."""
    attn_rotation, mlp_rotation = family.exact_matrices
    for layer, (q_attn, q_mlp) in zip(model.model.layers, bases):
        for block, q, name in (("attention", q_attn, attn_rotation), ("mlp", q_mlp, mlp_rotation)):
            _read_in(_readers(layer, family, block), q)
            _set(getattr(layer, name), q)


@torch.no_grad()
def apply_transform(model, family: Family, kind: str, device="cpu", calibration_ids=None) -> None:
    """Transform `model` (a winaconv runtime model) in place; the dense function is unchanged.
    "pca" needs calibration_ids ([sequences, length] token ids) to find its basis."""
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown transform {kind!r}; choose from {TRANSFORMS}")
    check_transform(family, kind)
    if kind == "none":
        return
    if kind == "pca" and calibration_ids is None:
        raise ValueError("the pca transform needs calibration token ids")
    if kind == "exact" and family.output_norms:
        _rotate_block_inputs(model, family, exact_bases(model, family, device))
        return
    fold_norms(model, family)
    if kind == "exact":
        bases = exact_bases(model, family, device)
        _rotate(model, family, bases, bases[-1][1])
        return
    if kind == "pca":
        q = _principal_basis(residual_covariance(model, calibration_ids, device))
    else:
        q = global_basis(model, family, device)
    _rotate(model, family, [(q, q)] * model.config.num_hidden_layers, q)

