"""Converting a model into a winaconv checkpoint: the pipeline (pipeline.py) and its stages, one module each."""

from ..options import ConvertOptions
from .pipeline import ConvertReport, convert

__all__ = ["ConvertOptions", "ConvertReport", "convert"]
