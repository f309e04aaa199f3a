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
(docs/results.md: their cost in bytes and accuracy on Gemma 3 270M).
"""

import copy

import torch
from torch import nn

from winaconv_runtime.architectures import RESIDUAL_WRITERS, Family, projection_sizes
from winaconv_runtime.checkpoint_format import TRANSFORMS

from ..errors import WinaconvError
from .layers import DecoderLayers, capture_layer_inputs, layer_outputs
from .weights import ModelWeights


def available_transforms(family: Family) -> tuple[str, ...]:
    return TRANSFORMS if family.transforms is None else family.transforms


def default_transform(family: Family) -> str:
    """pca where rotations fold into the weights (README: Results); Gemma: none, which reads no extra
    bytes per token (docs/results.md)."""
    return "pca" if family.transforms is None else family.transforms[0]


def check_transform(family: Family, kind: str) -> None:
    """One-line error for a transform that would not keep this family's function exact."""
    allowed = available_transforms(family)
    if kind not in allowed:
        reason = ("a rotation of the residual stream would have to fold into the router and every expert, which "
                  "winaconv does not do yet" if family.is_moe else
                  "a norm on each block's output does not commute with a rotation of the residual stream")
        raise WinaconvError(f"transform '{kind}' is not available for {family.name} ({reason}); "
                            f"available: {', '.join(allowed)}")


def _readers(layer, family: Family, block: str) -> list[nn.Linear]:
    wanted = {"attention": ("q", "k", "v"), "mlp": ("gate", "up")}[block]
    return [layer.get_submodule(path) for path, projs in family.linears if set(projs) <= set(wanted)]


def _writers(layer, family: Family) -> list[nn.Linear]:
    return [layer.get_submodule(path) for path, projs in family.linears if set(projs) <= set(RESIDUAL_WRITERS)]


def _path_of(family: Family, projection: str) -> str:
    return next(path for path, projs in family.linears if projection in projs)


def _segment(weight: torch.Tensor, family: Family, config, projection: str) -> torch.Tensor:
    """Rows of `projection` inside the (possibly fused) weight that holds it, in float64."""
    sizes = projection_sizes(config)
    projs = next(projs for _, projs in family.linears if projection in projs)
    start = sum(sizes[p][1] for p in projs[: projs.index(projection)])
    return weight[start : start + sizes[projection][1]].double()


def _set(param: torch.Tensor, value: torch.Tensor) -> None:
    param.data = value.to(dtype=param.dtype, device=param.device).contiguous()


# Large matrices (embeddings, lm_head: vocabulary x hidden) are transformed this many rows at a time, so their
# float64 temporaries stay small next to the matrix itself (a streamed conversion's memory bound counts on it).
ROWS_PER_CHUNK = 8192


def _by_rows(weight: torch.Tensor, step, device) -> torch.Tensor:
    """step(rows in float64 on `device`) for every block of rows, gathered in weight's dtype and device."""
    out = torch.empty_like(weight)
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
        out[start : start + ROWS_PER_CHUNK] = step(weight[start : start + ROWS_PER_CHUNK].to(device, torch.float64))
    return out


def _folded(weight: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """A reader's weight with its norm's gain folded in, rounded to the weight's dtype."""
    gain = gain.to(weight.device, torch.float64)
    return _by_rows(weight, lambda rows: rows * gain, weight.device)


def untie_embeddings(model) -> None:
    if model.lm_head.weight is model.get_input_embeddings().weight or model.config.tie_word_embeddings:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False


@torch.no_grad()
def _fold(norm, linears) -> None:
    gain = norm.weight.double()
    for linear in linears:
        _set(linear.weight, _folded(linear.weight, gain))
    _set(norm.weight, torch.ones_like(gain))


@torch.no_grad()
def fold_layer_norms(layer, family: Family) -> None:
    """Multiply a decoder layer's RMSNorm weights into the linears reading their output; set the norms to 1."""
    _fold(layer.input_layernorm, _readers(layer, family, "attention"))
    _fold(layer.post_attention_layernorm, _readers(layer, family, "mlp"))


@torch.no_grad()
def fold_head_norm(model) -> None:
    """The final norm into lm_head (untied from the embeddings first)."""
    untie_embeddings(model)
    _fold(model.model.norm, [model.lm_head])


def principal_basis(gram: torch.Tensor) -> torch.Tensor:
    """Orthogonal Q whose columns are the eigenvectors of a symmetric matrix, largest first."""
    _, vectors = torch.linalg.eigh(gram)
    # row-major, as the resume journal reads it back: LAPACK's column-major Q made MKL take another product
    # kernel on one host, and a resumed conversion's embeddings came out 1 ulp off the uninterrupted one's
    return vectors.flip(-1).contiguous()


def _gram(weight: torch.Tensor) -> torch.Tensor:
    return weight.T @ weight


def add_global_gram(total: torch.Tensor, layer, family: Family) -> None:
    """The global basis diagonalises the sum over every reader of W^T W / |W|^2 (norms folded)."""
    for linear in _readers(layer, family, "attention") + _readers(layer, family, "mlp"):
        w = linear.weight.to(device=total.device, dtype=torch.float64)
        total += _gram(w) / w.square().sum()


def _read_in(linears, q: torch.Tensor) -> None:
    """Linears that read a stream now carried as x Q: W -> W Q (float64 on Q's device)."""
    for linear in linears:
        _set(linear.weight, _by_rows(linear.weight, lambda rows: rows @ q, q.device))


def _write_in(linear, q: torch.Tensor) -> None:
    """A linear that writes a stream now carried as x Q: W -> Q^T W (bias Q^T b)."""
    _set(linear.weight, q.T @ linear.weight.to(q.device, torch.float64))
    if linear.bias is not None:
        _set(linear.bias, q.T @ linear.bias.to(q.device, torch.float64))


@torch.no_grad()
def rotate_layer(layer, family: Family, q_attn: torch.Tensor, q_mlp: torch.Tensor, q_next: torch.Tensor) -> None:
    """A (norm-folded) decoder layer whose attention reads the stream in basis q_attn, whose MLP reads it in
    q_mlp and whose output leaves it in q_next (the next layer's q_attn, or the basis lm_head reads)."""
    o_proj, down_proj = _writers(layer, family)
    _read_in(_readers(layer, family, "attention"), q_attn)
    _write_in(o_proj, q_mlp)
    _read_in(_readers(layer, family, "mlp"), q_mlp)
    _write_in(down_proj, q_next)
    if hasattr(layer, "attn_shortcut"):
        _set(layer.attn_shortcut, q_attn.T @ q_mlp)
        _set(layer.mlp_shortcut, q_mlp.T @ q_next)


@torch.no_grad()
def rotate_ends(model, q_first: torch.Tensor, q_final: torch.Tensor) -> None:
    """Embeddings write the stream in the first layer's basis; lm_head (norm folded) reads it in q_final."""
    embed = model.get_input_embeddings()
    _set(embed.weight, _by_rows(embed.weight, lambda rows: rows @ q_first, q_first.device))
    _read_in([model.lm_head], q_final)


@torch.no_grad()
def rotate_layer_inputs(layer, family: Family, q_attn: torch.Tensor, q_mlp: torch.Tensor) -> None:
    """Gemma's exact transform: block inputs rotated online, x -> x Q, and the readers' weights W -> W Q;
    the residual stream, the norms and the tied embeddings stay as they are."""
    attn_rotation, mlp_rotation = family.exact_matrices
    for block, q, name in (("attention", q_attn, attn_rotation), ("mlp", q_mlp, mlp_rotation)):
        _read_in(_readers(layer, family, block), q)
        _set(getattr(layer, name), q)


class LayerTransform:
    """The transform, applied one decoder layer at a time so that a conversion can onload layers one by one.

    `raw(names)` gives untransformed source tensors by state-dict name; the exact transform's bases come
    from there (a layer's output basis is the next layer's attention basis, read ahead). global and pca
    need their one basis first (model_wide_basis: `global_basis`, or residual_covariance over norm-folded layers),
    passed as `basis`. Then `ends(model)` transforms embeddings and lm_head and `layer(layer, index)` each
    decoder layer; every tensor gets the same float64 arithmetic whichever order the layers come in.
    """

    def __init__(self, kind: str, family: Family, config, raw, device="cpu", basis: torch.Tensor | None = None):
        if kind not in TRANSFORMS:
            raise ValueError(f"unknown transform {kind!r}; choose from {TRANSFORMS}")
        check_transform(family, kind)
        if kind in ("global", "pca") and basis is None:
            raise ValueError(f"the {kind} transform needs its basis")
        self.kind, self.family, self.config, self.raw, self.device = kind, family, config, raw, device
        self.basis = basis
        self._bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def folds_norms(self) -> bool:
        return self.kind != "none" and not self.family.output_norms

    def exact_bases(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q_attn, Q_mlp) of a layer: right singular vectors of its (norm-folded) k_proj and gate_proj."""
        if index not in self._bases:
            prefix = f"model.layers.{index}."
            k_name, gate_name = (f"{prefix}{_path_of(self.family, p)}.weight" for p in ("k", "gate"))
            norms = {} if self.family.output_norms else {k_name: f"{prefix}input_layernorm.weight",
                                                         gate_name: f"{prefix}post_attention_layernorm.weight"}
            tensors = self.raw([k_name, gate_name, *norms.values()])
            bases = []
            for name, projection in ((k_name, "k"), (gate_name, "gate")):
                weight = _folded(tensors[name], tensors[norms[name]]) if norms else tensors[name]
                segment = _segment(weight, self.family, self.config, projection)
                bases.append(principal_basis(_gram(segment.to(self.device))))
            self._bases = {i: b for i, b in self._bases.items() if i >= index - 1}  # keep the look-ahead only
            self._bases[index] = tuple(bases)
        return self._bases[index]

    @torch.no_grad()
    def ends(self, model) -> None:
        """Embeddings and lm_head (the final norm folded into it)."""
        if not self.folds_norms:
            return
        fold_head_norm(model)
        if self.kind == "exact":
            last = self.config.num_hidden_layers - 1
            rotate_ends(model, self.exact_bases(0)[0], self.exact_bases(last)[1])
        else:
            rotate_ends(model, self.basis, self.basis)

    @torch.no_grad()
    def layer(self, layer, index: int) -> None:
        if self.kind == "none":
            return
        if self.kind == "exact" and self.family.output_norms:
            rotate_layer_inputs(layer, self.family, *self.exact_bases(index))
            return
        fold_layer_norms(layer, self.family)
        if self.kind == "exact":
            q_attn, q_mlp = self.exact_bases(index)
            last = index + 1 == self.config.num_hidden_layers
            rotate_layer(layer, self.family, q_attn, q_mlp, q_mlp if last else self.exact_bases(index + 1)[0])
        else:
            rotate_layer(layer, self.family, self.basis, self.basis, self.basis)


@torch.no_grad()
def global_basis(layers, family: Family, device) -> torch.Tensor:
    """The global transform's Q from norm-folded layers (an iterable of decoder layers, in order)."""
    total = None
    for layer in layers:
        if total is None:
            hidden = layer.input_layernorm.weight.shape[0]
            total = torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
        add_global_gram(total, layer, family)
    return principal_basis(total)


@torch.no_grad()
def apply_transform(model, family: Family, kind: str, device="cpu", calibration_ids=None) -> None:
    """Transform `model` (a winaconv runtime model, whole in memory) in place; the dense function is unchanged.
    "pca" needs calibration_ids ([sequences, length] token ids) to find its basis."""
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown transform {kind!r}; choose from {TRANSFORMS}")
    check_transform(family, kind)
    if kind == "pca" and calibration_ids is None:
        raise ValueError("the pca transform needs calibration token ids")
    raw = ModelWeights(model)  # untransformed: _set replaces parameters' data, never writes into it
    basis = None
    if kind in ("global", "pca"):  # the first pass reads the layers into a copy, as a conversion reads its source
        basis = model_wide_basis(copy.deepcopy(model), family, kind, raw, calibration_ids, device)
    plan = LayerTransform(kind, family, model.config, raw.read, device, basis)
    plan.ends(model)
    for index, layer in enumerate(model.model.layers):
        plan.layer(layer, index)


@torch.no_grad()
def residual_covariance(model, input_ids: torch.Tensor, device, micro_batch: int = 8, layers=None) -> torch.Tensor:
    """sum over tokens of n n^T, float64, where n is every normed residual stream the model reads
    (each layer's two norms and the final one), layer by layer like the calibration itself."""
    layers = layers or DecoderLayers(model)
    hidden, layer_kwargs = capture_layer_inputs(model, input_ids, device)
    size = model.config.hidden_size
    covariance = torch.zeros(size, size, dtype=torch.float64, device=device)

    def accumulate(module, args, output):
        flat = output.reshape(-1, size).double()
        covariance.add_(flat.T @ flat)

    for index, kwargs in enumerate(layer_kwargs):
        with layers.open(index) as layer:
            layer.to(device)
            handles = [norm.register_forward_hook(accumulate)
                       for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
            try:
                hidden = layer_outputs(layer, hidden, kwargs, device, micro_batch)
            finally:
                for handle in handles:
                    handle.remove()
                layer.to("cpu")
    final_norm = model.model.norm.to(device)
    for chunk in hidden.split(micro_batch):
        accumulate(final_norm, None, final_norm(chunk.to(device)))
    final_norm.to("cpu")
    return covariance


@torch.no_grad()
def model_wide_basis(model, family, kind: str, weights, input_ids, device, progress=None) -> torch.Tensor:
    """The one Q of the global / pca transform, from a first pass over the layers read from `weights` into
    `model` (a skeleton whose layers it leaves on the meta device), norms folded."""
    task = progress.add_task(f"{kind} basis (first pass)", total=model.config.num_hidden_layers) if progress else None

    def prepare(layer, index):
        fold_layer_norms(layer, family)
        if progress:
            progress.update(task, completed=index + 1)

    folded = DecoderLayers(model, weights, prepare=prepare)
    if kind == "global":
        return global_basis(_each(folded), family, device)
    fold_head_norm(model)  # the covariance counts the final norm's output, whose gain goes to lm_head
    return principal_basis(residual_covariance(model, input_ids, device, layers=folded))


def _each(layers):
    for index in range(len(layers)):
        with layers.open(index) as layer:
            yield layer
