"""Experiment: does a data-driven global rotation (PCA of the normed residual stream) help WINA/TEAL?

The `global` transform picks its basis from the weights (eigenvectors of the summed W^T W of every
matrix reading the residual stream) and measured worse than no transform at all. LaRoSA (arXiv
2507.01299) rotates with the principal components of the activations instead, which concentrates
each token's energy in few channels: exactly what magnitude-based sparsity wants. This script swaps
the global transform's basis for the eigenvectors of sum over tokens and norms of n n^T (n: the
normed residual stream, the input of q/k/v and gate/up after the norm weights are folded) and runs
the accuracy study's configurations through it, same budget, same texts.

    python benchmarks/experiments/pca_rotation.py --calib-tokens 4096 --greedy-tokens 1024

Writes benchmarks/experiments/pca_rotation.json and .md (the study's own table format).
"""

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import accuracy_study  # noqa: E402

from winaconv import transform  # noqa: E402

CALIBRATION_IDS: list[torch.Tensor] = []  # filled in main(), before any conversion runs


@torch.no_grad()
def activation_basis(model, family, device) -> torch.Tensor:
    """Principal components of the normed residual stream, read by every block and by lm_head."""
    hidden = model.config.hidden_size
    covariance = torch.zeros(hidden, hidden, dtype=torch.float64)
    norms = [m for layer in model.model.layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm)

    def accumulate(module, args, output):
        flat = output.reshape(-1, hidden).double()
        covariance.add_(flat.T @ flat)

    handles = [norm.register_forward_hook(accumulate) for norm in norms]
    try:
        for ids in CALIBRATION_IDS:
            model(input_ids=ids[None])
    finally:
        for handle in handles:
            handle.remove()
    return transform._principal_basis(covariance.to(device))


def main():
    from transformers import AutoTokenizer

    from winaconv.calibration_data import token_sequences
    from winaconv.eval_text import calibration_texts

    argv = sys.argv[1:]
    model = accuracy_study.base_model_folder(accuracy_study.DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model)
    calib_tokens = int(argv[argv.index("--calib-tokens") + 1]) if "--calib-tokens" in argv else 8192
    seq_len = int(argv[argv.index("--seq-len") + 1]) if "--seq-len" in argv else 512
    CALIBRATION_IDS.extend(token_sequences(tokenizer, calibration_texts(), seq_len, calib_tokens, 0))
    transform.global_basis = activation_basis  # the global transform now rotates by the activations' PCA
    accuracy_study.CONFIGS = [
        ("TEAL", "teal", "none", "paper"),
        ("TEAL, PCA rotation", "teal", "global", "paper"),
        ("WINA, PCA rotation", "wina", "global", "paper"),
    ]
    sys.argv = [sys.argv[0], "--out", str(HERE / "pca_rotation.json"), "--md", str(HERE / "pca_rotation.md"),
                "--work", "/tmp/winaconv-pca", "--check-dense", *argv]
    accuracy_study.main()


if __name__ == "__main__":
    main()
