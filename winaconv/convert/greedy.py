"""Block outputs for TEAL's greedy search (allocate.greedy_path), each piece computed once.

At every step the search runs the block once per projection, with that projection's threshold raised.
Most of what such a trial computes was already computed, by another trial of the same step or by a trial
of an earlier step. Two caches skip that work without changing a bit of any result: a cached tensor is
the very tensor the same operations gave before, and everything that does run, runs on the same shapes
in the same order as a plain forward of the block per trial.

* The attention block's output on the measured positions, per combination of attention thresholds: after
  a step that raised an MLP projection, every attention trial's attention output is the previous step's.
* The outputs of the modules that read a block's input (its input norm, and the projections that read the
  normed input: q, k, v, gate, up), per input tensor and thresholds: a trial raising gate reuses up's
  output, one raising q reuses k's and v's, and an attention trial after a down step reuses gate's and up's.

Trials are not stacked into larger products: a row of a CPU matrix product can round differently with
the number of rows (the BLAS picks its blocking by shape), so stacking would move errors in their last bits
and could change the path.
"""

import torch

from winaconv_runtime.architectures import ATTENTION_PROJECTIONS, EXPERT_PROJECTIONS, RESIDUAL_WRITERS
from winaconv_runtime.modeling_winaconv import attention_residual, mlp_residual, routed_experts, sparse_linears
from winaconv_runtime.sparse_experts import set_expert_thresholds

from .statistics import EXPERT_GRIDS, threshold_at, thresholds_at


class BlockTrials:
    """One decoder layer's output on the measured positions at given per-projection sparsities, for one
    greedy search: `with BlockTrials(...) as block: block.output(sparsities)`, and `block.step_done()`
    after each step, which drops what no later trial can use (sparsities only grow)."""

    def __init__(self, layer, family, grids, norm_scored, inputs, layer_kwargs, tail: int):
        self.layer, self.grids, self.inputs, self.layer_kwargs, self.tail = layer, grids, inputs, layer_kwargs, tail
        self.linears = [(projections, linear, [p in norm_scored for p in projections])
                        for projections, linear in sparse_linears(layer, family)]
        self.experts = routed_experts(layer, family)
        self.experts_scored = [p in norm_scored for p in EXPERT_PROJECTIONS]
        self.attention_linears = [linear for projections, linear, _ in self.linears
                                  if set(projections) <= set(ATTENTION_PROJECTIONS)]
        self.reading_modules = [(norm, None) for norm in _input_norms(layer, family)] + [
            (linear, linear) for projections, linear, _ in self.linears if not set(projections) & set(RESIDUAL_WRITERS)]
        activation = getattr(layer.mlp, "act_fn", None)
        if isinstance(activation, torch.nn.Module):  # act(gate): a reused gate output reuses its activation
            self.reading_modules.append((activation, None))
        self.applied = {}  # linear -> the thresholds set on it
        self.attention = {}  # attention linears' thresholds -> the attention block's output on the measured positions
        self.outputs = {}  # (module, its thresholds, input) -> (input, input version, output, output version)
        self.used = set()  # keys of both caches read or written since the last step_done
        self.originals = {}

    def __enter__(self):
        for module, thresholds_of in self.reading_modules:
            self._remember_outputs(module, thresholds_of)
        return self

    def __exit__(self, *exc):
        for module, had_own in self.originals.values():
            if had_own is None:
                del module.forward
            else:
                module.forward = had_own
        self.originals.clear()
        self.attention.clear()
        self.outputs.clear()
        for _, linear, _ in self.linears:
            linear.set_thresholds(None, None)  # every projection dense again
        if self.experts is not None:
            set_expert_thresholds(self.experts, None, None)

    def output(self, sparsities: dict[str, float]) -> torch.Tensor:
        """The block's output on the measured positions with these sparsities."""
        self._set_thresholds(sparsities)
        return mlp_residual(self.layer, self._attended())

    def step_done(self) -> None:
        """Forget what the last step did not read: its thresholds are behind the search for good."""
        self.attention = {k: v for k, v in self.attention.items() if ("attention", k) in self.used}
        self.outputs = {k: v for k, v in self.outputs.items() if k in self.used}
        self.used = set()

    def _set_thresholds(self, sparsities) -> None:
        """Only linears whose thresholds change are touched (setting one rebuilds its per-channel table)."""
        for projections, linear, scored_with_norm in self.linears:
            thresholds = tuple(threshold_at(self.grids[p], sparsities[p]) for p in projections)
            if self.applied.get(linear) != thresholds:
                linear.set_thresholds(list(thresholds), scored_with_norm)
                self.applied[linear] = thresholds
        if self.experts is not None:
            levels = tuple(sparsities[p] for p in EXPERT_PROJECTIONS)
            if self.applied.get(self.experts) != levels:
                table = torch.stack([thresholds_at(self.grids[EXPERT_GRIDS[p]], sparsities[p])
                                     for p in EXPERT_PROJECTIONS], dim=1)
                set_expert_thresholds(self.experts, table, self.experts_scored)
                self.applied[self.experts] = levels

    def _attended(self) -> torch.Tensor:
        key = tuple(self.applied[linear] for linear in self.attention_linears)
        attended = self.attention.get(key)
        if attended is None:
            attended = attention_residual(self.layer, self.inputs, **self.layer_kwargs)[:, self.tail:]
            self.attention[key] = attended
        self.used.add(("attention", key))
        return attended

    def _remember_outputs(self, module, thresholds_of) -> None:
        """Make `module` return its earlier output for the same input tensor (unchanged since) and thresholds."""
        original = module.forward
        self.originals[id(module)] = (module, module.__dict__.get("forward"))

        def forward(x, *args, **kwargs):
            if args or kwargs or not isinstance(x, torch.Tensor) or _in_fused_group(module):
                return original(x, *args, **kwargs)
            key = (id(module), self.applied.get(thresholds_of), id(x))
            entry = self.outputs.get(key)
            if entry is None or entry[0] is not x or entry[1] != x._version or entry[2]._version != entry[3]:
                output = original(x)
                entry = self.outputs[key] = (x, x._version, output, output._version)
            self.used.add(key)
            return entry[2]

        module.forward = forward


def _in_fused_group(module) -> bool:
    """A linear of a joined shared-input group (GPU) may take its output from a launch made by another member for
    the same input tensor; skipping its call would leave that output waiting, stale once thresholds change."""
    group = getattr(module, "shared_input_group", None)
    return group is not None and group.joined


def _input_norms(layer, family) -> list:
    """The norms that read the residual stream: attention's input norm and the MLP's (Gemma: the pre-feedforward
    norm; its post-attention norm reads the attention's output)."""
    mlp_norm = "pre_feedforward_layernorm" if family.output_norms else "post_attention_layernorm"
    return [getattr(layer, "input_layernorm"), getattr(layer, mlp_norm)]
