"""Where a converted checkpoint loses perplexity at one level, and which cheap levers win it back.

Takes one winaconv checkpoint (e.g. the default WINA pca conversion of SmolLM2) and, at one stored level,
measures the held-out perplexity (the accuracy study's protocol: 4,096 Lee tokens, windows of 512) of:

- the checkpoint as stored, and with one projection type, or one layer, left dense (where the loss is);
- other gating scores at the same per-projection sparsities (thresholds re-taken from the calibration
  inputs): |x_i| (TEAL), |x_i|*||W[:,i]|| (WINA), powers of the column norm, and "output" norms: the
  column norms of the map to the block's output (v through o_proj; gate and up through down_proj,
  weighted by the calibration's rms gain of the SwiGLU);
- two weight-side corrections for the dropped channels, fitted on the calibration inputs at this level:
  a bias (the mean dropped contribution) and a least-squares refit of W on the masked inputs;
- the share of channels the thresholds really drop on the held-out text.

Every variant changes one thing against the stored checkpoint. Calibration inputs are the dense model's
(as the converter's). Results: one JSON.

    python benchmarks/experiments/accuracy_probe.py CHECKPOINT --level 0.5 --device cuda --out probe.json
"""

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from winaconv.calibration_data import token_sequences
from winaconv.eval_text import calibration_texts, eval_texts
from winaconv.evaluate import find_model, load_model, load_tokenizer, perplexity, tokenize
from winaconv_runtime.architectures import PROJECTIONS
from winaconv_runtime.checkpoint_format import level_key
from winaconv_runtime.modeling_winaconv import sparse_linears


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


class Probe:
    def __init__(self, checkpoint, device, level, calib_tokens, eval_tokens, max_samples):
        ref = find_model(checkpoint)
        self.tokenizer = load_tokenizer(ref)
        self.model = load_model(ref, device, "float32").model
        self.family = self.model.winaconv_family
        self.level = level
        self.device = device
        section = self.model.config.winaconv
        self.norm_scored = tuple(section.get("norm_scored", ()))
        self.stored = section["levels"][level_key(level)]
        self.eval_ids = tokenize(self.tokenizer, eval_texts())[: eval_tokens or None]
        self.calib_ids = token_sequences(self.tokenizer, calibration_texts(), 512, calib_tokens, 0)
        self.layers = list(self.model.model.layers)
        self.max_samples = max_samples
        # The first thresholds set also lay each weight out for the sparse path (W^T storage), after which the
        # column norms, hence tau, come out a few ulps different; such ulps flip a few decisions and move the
        # perplexity of one 512-token window by up to 4% (measured), so every variant starts from that state.
        for _ in range(2):
            self.set_level(level)

    # ------------------------------------------------------------ helpers
    def ppl(self) -> float:
        nll, _ = perplexity(self.model, self.eval_ids, 512, 512)
        return float(torch.tensor(nll).exp())

    def linears(self):
        for index, layer in enumerate(self.layers):
            for projections, linear in sparse_linears(layer, self.family):
                yield index, projections, linear

    def set_level(self, level):
        self.model.set_sparsity(level)

    @torch.no_grad()
    def write_tau(self, linear, segment, tau):
        linear.tau[segment].copy_(tau)
        if linear.shared_input_group is not None:
            linear.shared_input_group.fuse()

    @torch.no_grad()
    def capture_inputs(self):
        """Each linear's dense input on the calibration sequences (all tokens), on the device."""
        self.set_level(0)
        inputs, handles = {}, []
        for index, projections, linear in self.linears():
            def record(module, args, key=(index, projections)):
                inputs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]))
            handles.append(linear.register_forward_pre_hook(record))
        try:
            for sequence in self.calib_ids.split(8):
                self.model(input_ids=sequence.to(self.device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        self.inputs = {k: torch.cat(v) for k, v in inputs.items()}

    def stored_sparsity(self, index, projection):
        return self.stored["sparsities"][index][PROJECTIONS.index(projection)]

    # ------------------------------------------------------------ per-channel score weights
    @torch.no_grad()
    def score_weights(self, kind, index, projection, linear, segment):
        weight = linear.weight.split(linear.segment_sizes, dim=0)[segment].float()
        norms = weight.norm(dim=0)
        if kind == "magnitude":
            return torch.ones_like(norms)
        if kind == "wina":
            return norms
        if kind.startswith("norm^"):
            return norms ** float(kind[5:])
        if kind == "output":
            return self.output_norms(index, projection, weight, norms)
        raise ValueError(kind)

    @torch.no_grad()
    def output_norms(self, index, projection, weight, norms):
        layer = self.layers[index]
        config = self.model.config
        if projection == "v":
            heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            o_weight = layer.self_attn.o_proj.weight.float()
            total = torch.zeros_like(norms)
            for head in range(heads):
                group = head // (heads // kv_heads)
                block = o_weight[:, head * head_dim:(head + 1) * head_dim] @ weight[group * head_dim:(group + 1) * head_dim]
                total += block.square().sum(dim=0)
            return total.sqrt()
        if projection in ("gate", "up"):
            x = self.mlp_inputs(index)
            mlp = layer.mlp
            gate = x @ self.segment_weight(mlp, "gate").T
            up = x @ self.segment_weight(mlp, "up").T
            if projection == "up":
                gain = F.silu(gate)
            else:
                sig = torch.sigmoid(gate)
                gain = up * sig * (1 + gate * (1 - sig))
            rms = gain.square().mean(dim=0).sqrt()
            down = mlp.down_proj.weight.float()
            return (down * rms).matmul(weight).norm(dim=0)
        return norms  # q, k (through softmax), o and down (straight into the residual): their own columns

    def mlp_inputs(self, index):
        for (i, projections), x in self.inputs.items():
            if i == index and "gate" in projections:
                return x[: self.max_samples].float()
        raise KeyError(index)

    def segment_weight(self, mlp, projection):
        for projections, linear in sparse_linears_of_mlp(mlp, self.family):
            if projection in projections:
                return linear.weight.split(linear.segment_sizes, dim=0)[projections.index(projection)].float()
        raise KeyError(projection)

    @torch.no_grad()
    def rescore(self, kind, only):
        """Thresholds of the projections in `only` re-taken for score `kind` at their stored sparsities."""
        self.set_level(self.level)
        for index, projections, linear in self.linears():
            x = self.inputs[(index, projections)]
            sample = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(index))[: self.max_samples]
                       .to(x.device)].abs().float()
            for segment, projection in enumerate(projections):
                if projection not in only:
                    continue
                w = self.score_weights(kind, index, projection, linear, segment)
                sparsity = self.stored_sparsity(index, projection)
                scores = (sample * w).flatten()
                k = max(1, min(scores.numel(), int(round(sparsity * scores.numel()))))
                t = scores.kthvalue(k).values if sparsity > 0 else torch.tensor(0.0, device=scores.device)
                tau = torch.where(w > 0, t / w, torch.full_like(w, float("inf")))
                self.write_tau(linear, segment, tau)

    # ------------------------------------------------------------ experiments
    @torch.no_grad()
    def perturbed(self, seed):
        """Perplexity with every threshold moved by a relative 1e-6 (random): the measurement's own noise."""
        self.set_level(self.level)
        generator = torch.Generator().manual_seed(seed)
        for index, projections, linear in self.linears():
            for segment in range(len(projections)):
                noise = 1 + 1e-6 * torch.randn(linear.tau[segment].shape, generator=generator)
                self.write_tau(linear, segment, linear.tau[segment] * noise.to(linear.tau.device))
        return self.ppl()

    def dense_projection(self, projection):
        self.set_level(self.level)
        for index, projections, linear in self.linears():
            if projection in projections:
                self.write_tau(linear, projections.index(projection), torch.zeros_like(linear.tau[0]))
        return self.ppl()

    def dense_layer(self, layer_index):
        self.set_level(self.level)
        for index, projections, linear in self.linears():
            if index == layer_index:
                for segment in range(len(projections)):
                    self.write_tau(linear, segment, torch.zeros_like(linear.tau[0]))
        return self.ppl()

    @torch.no_grad()
    def corrections(self):
        """Bias (mean dropped contribution) and least-squares refit, per segment, at this level."""
        self.set_level(self.level)
        biases, refits = {}, {}
        for index, projections, linear in self.linears():
            x = self.inputs[(index, projections)].double()
            for segment, projection in enumerate(projections):
                tau = linear.tau[segment].double()
                kept = x.abs() > tau
                masked = x * kept
                weight = linear.weight.split(linear.segment_sizes, dim=0)[segment].double()
                biases[index, projection] = ((x - masked).mean(dim=0) @ weight.T).float()
                gram = masked.T @ masked
                damp = 1e-2 * gram.diagonal().mean() + 1e-12
                gram.diagonal().add_(damp)
                cross = x.T @ masked
                refits[index, projection] = torch.linalg.solve(gram, (weight @ cross).T).T.float()
        return biases, refits

    def with_biases(self, biases):
        self.set_level(self.level)
        handles = []
        for index, projections, linear in self.linears():
            vector = torch.cat([biases[index, p] for p in projections])

            def add(module, args, output, vector=vector):
                return output + vector.to(output.dtype)
            handles.append(linear.register_forward_hook(add))
        try:
            return self.ppl()
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def with_refits(self, refits, only=PROJECTIONS):
        self.set_level(self.level)
        saved = []
        for index, projections, linear in self.linears():
            if not any(p in only for p in projections):
                continue
            old = linear.weight.data.clone()
            saved.append((linear, old))
            parts = [refits[index, p] if p in only else w for p, w in
                     zip(projections, old.split(linear.segment_sizes, dim=0))]
            linear.weight.data.copy_(torch.cat(parts))
            if linear.shared_input_group is not None:
                linear.shared_input_group.fuse()
        try:
            return self.ppl()  # tau (set from the original weights) is left as it is
        finally:
            for linear, old in saved:
                linear.weight.data.copy_(old)
                if linear.shared_input_group is not None:
                    linear.shared_input_group.fuse()

    @torch.no_grad()
    def realised_sparsity(self):
        """Fraction of input channels each projection type drops on the held-out text, parameter-weighted too."""
        self.set_level(self.level)
        dropped, seen, handles = {}, {}, []
        for index, projections, linear in self.linears():
            def record(module, args, projections=projections):
                x = args[0].reshape(-1, args[0].shape[-1])
                for segment, p in enumerate(projections):
                    drop = (x.abs() <= module.tau[segment]).float().mean().item()
                    dropped[p] = dropped.get(p, 0.0) + drop
                    seen[p] = seen.get(p, 0) + 1
            handles.append(linear.register_forward_pre_hook(record))
        try:
            self.ppl()
        finally:
            for handle in handles:
                handle.remove()
        measured = {p: dropped[p] / seen[p] for p in dropped}
        stored = {p: sum(row[PROJECTIONS.index(p)] for row in self.stored["sparsities"]) / len(self.layers)
                  for p in PROJECTIONS}
        return {"measured": measured, "stored": stored}


def sparse_linears_of_mlp(mlp, family):
    for path, projections in family.linears:
        if path.startswith("mlp."):
            yield projections, mlp.get_submodule(path[len("mlp."):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--level", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens (0: all of the split)")
    parser.add_argument("--max-samples", type=int, default=8192, help="calibration tokens used to re-take thresholds")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: layers,scores,corrections")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    probe = Probe(args.checkpoint, args.device, args.level, args.calib_tokens, args.eval_tokens, args.max_samples)
    results = {"checkpoint": args.checkpoint, "level": args.level, "norm_scored": list(probe.norm_scored)}

    def save():
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    probe.set_level(0)
    results["dense"] = probe.ppl()
    probe.set_level(args.level)
    results["stored"] = probe.ppl()
    log(f"dense {results['dense']:.3f}, stored {args.level:g}: {results['stored']:.3f}")
    results["noise"] = [probe.perturbed(seed) for seed in range(3)]
    log(f"thresholds x (1 + 1e-6 N(0,1)): {results['noise']}")
    results["realised_sparsity"] = probe.realised_sparsity()
    results["dense_projection"] = {p: probe.dense_projection(p) for p in PROJECTIONS}
    log(f"one projection type dense: {results['dense_projection']}")
    save()
    if "layers" not in skip:
        results["dense_layer"] = [probe.dense_layer(i) for i in range(len(probe.layers))]
        log(f"one layer dense: {[round(v, 2) for v in results['dense_layer']]}")
        save()
    probe.capture_inputs()
    if "scores" not in skip:
        kinds = ("wina", "magnitude", "norm^0.5", "norm^2", "output")
        results["rescored_all"] = {}
        for kind in kinds:
            probe.rescore(kind, PROJECTIONS)
            results["rescored_all"][kind] = probe.ppl()
        log(f"all projections re-scored: {results['rescored_all']}")
        results["rescored_one"] = {}
        for p in PROJECTIONS:
            results["rescored_one"][p] = {}
            for kind in kinds:
                if kind == "output" and p not in ("v", "gate", "up"):
                    continue
                probe.rescore(kind, (p,))
                results["rescored_one"][p][kind] = probe.ppl()
        log(f"one projection re-scored: {results['rescored_one']}")
        save()
    if "corrections" not in skip:
        biases, refits = probe.corrections()
        results["bias"] = probe.with_biases(biases)
        results["refit_all"] = probe.with_refits(refits)
        results["refit_one"] = {p: probe.with_refits(refits, (p,)) for p in PROJECTIONS}
        log(f"bias {results['bias']:.3f}, refit {results['refit_all']:.3f}, per projection {results['refit_one']}")
        save()
    save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
