"""safetensors shards written tensor by tensor (winaconv/convert/write.py)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from winaconv.convert.write import ShardedWriter, save_sharded


def test_shard_writer_writes_what_safetensors_writes(tmp_path):
    tensors = {"b.weight": torch.randn(3, 5), "a.10.w": torch.randn(2).bfloat16(), "a.2.w": torch.randn(4, 4).half(),
               "z": torch.arange(3), "c": torch.randn(7).double(), "m": torch.ones(2, dtype=torch.bool),
               "u": torch.arange(5, dtype=torch.uint8), "i": torch.arange(5, dtype=torch.int32)}
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    save_sharded(tensors, tmp_path, 10**9, {"format": "pt"})
    assert (tmp_path / "model.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()


def test_shard_writer_fills_planned_shards_in_any_order_and_resumes(tmp_path):
    from huggingface_hub import split_torch_state_dict_into_shards

    tensors = {f"layer.{i}.w": torch.randn(40 + i, 8) for i in range(6)}
    specs = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    writer = ShardedWriter(tmp_path, specs, 3000, {"format": "pt"})
    for name in ["layer.5.w", "layer.0.w", "layer.3.w"]:
        writer.put(name, tensors[name])
    writer.sync()
    with pytest.raises(ValueError, match="planned"):
        writer.put("layer.1.w", torch.zeros(3, 3))
    del writer  # a killed run: its files stay as they are
    resumed = ShardedWriter(tmp_path, specs, 3000, {"format": "pt"}, resume=True)
    resumed.mark_written(["layer.5.w", "layer.0.w", "layer.3.w"])
    for name in ["layer.1.w", "layer.2.w", "layer.4.w"]:
        resumed.put(name, tensors[name])
    resumed.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == split_torch_state_dict_into_shards(tensors, max_shard_size=3000).tensor_to_filename
    read = {}
    for shard in set(index["weight_map"].values()):
        read.update(load_file(tmp_path / shard))
    assert all(torch.equal(read[n], t) for n, t in tensors.items()) and len(read) == len(tensors)


def test_shard_writer_refuses_to_close_with_tensors_missing(tmp_path):
    writer = ShardedWriter(tmp_path, {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}, 10**9, {})
    writer.put("a", torch.zeros(2))
    with pytest.raises(ValueError, match="never written"):
        writer.close()
