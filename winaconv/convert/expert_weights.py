"""Routed experts stored one tensor per expert (how MoE checkpoints are published, and how transformers 5 saves
them): read under the fused names of transformers' experts module, as its own loader merges them.

    <layer>.mlp.experts.<e>.gate_proj.weight / up_proj / down_proj      (Qwen2-MoE, Qwen3-MoE, OLMoE)
    <layer>.block_sparse_moe.experts.<e>.w1.weight / w3 / w2            (Mixtral; its router block_sparse_moe.gate)
become <layer>.mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then up rows) and .down_proj [E, H, I], read
one layer at a time like every other tensor.
"""

import re

import torch

_PER_EXPERT = re.compile(r"^(?P<layer>.+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<expert>\d+)\."
                         r"(?P<part>gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
_PARTS = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "down_proj": "down", "w2": "down"}
_RENAMED = (".block_sparse_moe.", ".mlp.")


class FusedExpertWeights:
    """`weights` (names(), read(names)) with per-expert tensors read under the fused names."""

    def __init__(self, weights):
        self.weights = weights
        self.fused: dict[str, list[list[str]]] = {}  # fused name -> per expert, the source names to join
        parts: dict[str, dict[int, dict[str, str]]] = {}
        self.renamed = {}
        for name in weights.names():
            match = _PER_EXPERT.match(name)
            if match:
                experts = parts.setdefault(match["layer"], {})
                experts.setdefault(int(match["expert"]), {})[_PARTS[match["part"]]] = name
            elif _RENAMED[0] in name:
                self.renamed[name.replace(*_RENAMED)] = name
        for layer, experts in parts.items():
            order = [experts[e] for e in sorted(experts)]
            if sorted(experts) != list(range(len(experts))) or any(len(p) != 3 for p in order):
                continue  # incomplete: check_complete names what is missing under the fused names
            self.fused[f"{layer}.mlp.experts.gate_up_proj"] = [[p["gate"], p["up"]] for p in order]
            self.fused[f"{layer}.mlp.experts.down_proj"] = [[p["down"]] for p in order]

    def names(self) -> set[str]:
        hidden = {n for sources in self.fused.values() for parts in sources for n in parts} | set(self.renamed.values())
        return (self.weights.names() - hidden) | set(self.fused) | set(self.renamed)

    def read(self, names) -> dict[str, torch.Tensor]:
        names = list(names)
        direct = [self.renamed.get(n, n) for n in names if n not in self.fused]
        tensors = self.weights.read(direct)
        result = {n: tensors[self.renamed.get(n, n)] for n in names if n not in self.fused}
        for name in (n for n in names if n in self.fused):
            per_expert = self.weights.read([n for parts in self.fused[name] for n in parts])
            result[name] = torch.stack([torch.cat([per_expert[n] for n in parts]) for parts in self.fused[name]])
        return result

    def fingerprint(self) -> list:
        return self.weights.fingerprint()

    def __getattr__(self, name):  # folder and the rest of the wrapped reader
        return getattr(self.weights, name)


def with_fused_experts(weights):
    """`weights` itself where no tensor is stored per expert, else a reader that fuses them."""
    per_expert = any(_PER_EXPERT.match(n) for n in weights.names())
    return FusedExpertWeights(weights) if per_expert else weights
