"""winaconv: training-free WINA activation sparsity for transformers language models."""

__version__ = "0.1.0"
