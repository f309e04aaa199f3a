"""Using a model or checkpoint: loading it, its perplexity (evaluate) and its decode speed (speed)."""
