"""What an exact rotation would cost on a Gemma 2/3 model: extra weights read per token.

A Gemma block writes post_norm(y) = (y / rms(y)) * (1 + w) into the residual stream. A rotated
residual stream needs (y / rms(y)) diag(1 + w) Q from the block; rms is blind to a rotation of y
but not to diag(1 + w), so the gain cannot be folded into the writer, and diag(1 + w) Q is not
orthogonal unless all |1 + w| are equal. The cheapest exact form keeps the residual stream in the
original basis and rotates each block's normed input online (x -> x Q before q/k/v and gate/up,
whose weights become W Q): one dense hidden x hidden matrix per block, two per layer, the same count
as the exact transform's shortcuts on Llama. Embeddings stay tied and the final norm is untouched.

    python benchmarks/gemma_transforms.py benchmarks/assets/gemma3-270m   # a folder with config.json
"""

import argparse
import json
from pathlib import Path

from accuracy_study import exact_cost  # same byte model as the Llama exact transform's row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config_folder", type=Path)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.config_folder)
    cost = exact_cost(config)  # 2 hidden x hidden dense matrices per layer, read for every token
    print(f"{config.model_type}: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"vocab {config.vocab_size}, tied embeddings {config.tie_word_embeddings}")
    print(f"projection weights per layer: {cost['layer_weights']:,}; "
          f"online rotations per layer: {cost['shortcut_weights_per_layer']:,} "
          f"(+{cost['extra_per_layer_dense']:.1%} of the layer)")
    print("| sparsity | extra bytes per layer | extra bytes per token (lm_head included) |")
    print("|---|---|---|")
    print(f"| 0% | {cost['extra_per_layer_dense']:.1%} | {cost['extra_per_token_dense']:.1%} |")
    for level, per_layer in cost["extra_per_layer_at"].items():
        print(f"| {float(level):.0%} | {per_layer:.1%} | {cost['extra_per_token_at'][level]:.1%} |")
    if args.json:
        args.json.write_text(json.dumps({"model_type": config.model_type, **cost}, indent=1))


if __name__ == "__main__":
    main()
