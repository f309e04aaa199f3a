"""Experiment: does keeping position 0 (the attention sink) dense change WINA's or TEAL's perplexity?

    python benchmarks/experiments/first_token_dense.py CHECKPOINT [CHECKPOINT ...]

Evaluates each checkpoint at sparsity 0.5 on the first 4,096 held-out tokens (windows of 512), once with
every token sparse (what the runtime does) and once with the first position of each window dense.
"""

import math
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from winaconv.eval_text import eval_texts
from winaconv.evaluate import perplexity, tokenize


def first_position_dense(sparse_forward):
    def forward(self, x):
        y = sparse_forward(self, x)
        if self.tau is not None and x.dim() == 3 and x.shape[1] > 1:
            y = y.clone()
            y[:, :1] = torch.nn.functional.linear(x[:, :1], self.weight, self.bias)
        return y

    return forward


def main(folders):
    for folder in folders:
        ids = tokenize(AutoTokenizer.from_pretrained(folder), eval_texts())[:4096]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32, sparsity=0.5)
        sparse_linear = type(model.model.layers[0].self_attn.o_proj)  # the folder's own SparseLinear class
        sparse_forward = sparse_linear.forward
        for mode, forward in (("every token sparse", sparse_forward), ("first position dense", first_position_dense(sparse_forward))):
            sparse_linear.forward = forward
            nll, tokens = perplexity(model, ids, 512, 512)
            print(f"{folder}: {mode}: perplexity {math.exp(nll):.2f} over {tokens} tokens", flush=True)
        sparse_linear.forward = sparse_forward


if __name__ == "__main__":
    main(sys.argv[1:])
