"""Helpers shared by the tests (not a test module): running the CLI, the one-line-error assertions, the
float64 reference of the sparsity rule, and writing a model held in memory as a checkpoint. The small models
are built in models.py, the conversion budgets are in budgets.py."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from winaconv.convert.write import save_sharded, saved_state_names, write_checkpoint_files
from winaconv_runtime.checkpoint_format import SAFETENSORS_METADATA


def run_cli(*args):
    """`winaconv ARGS...` in this process (click's runner; stdout and stderr both in .output)."""
    from click.testing import CliRunner

    from winaconv.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(output: str) -> str:
    """The only non-blank line of `output`, which must start with "Error: "."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


def assert_one_line_error(result, *words, after_progress=False) -> str:
    """The command failed with one line starting "Error:" and no traceback; with after_progress, the
    "winaconv: ..." lines a command prints while it works may come first. Returns the error line."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    if after_progress:  # the error must be the last line, and the only one
        lines = [line for line in result.output.strip().splitlines() if line.strip()]
        assert [line for line in lines if line.startswith("Error:")] == lines[-1:], result.output
        line = lines[-1]
    else:
        line = one_error_line(result.output)
    for word in words:
        assert word in line, line
    return line


def problem_lines(result) -> list[str]:
    """The `problem: ...` lines `winaconv inspect` printed on stderr."""
    return [line for line in result.stderr.splitlines() if line.startswith("problem: ")]


def edit_config(folder: Path, change) -> None:
    """Apply `change` to the dict of folder/config.json and write it back."""
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def assert_one_line_exception(exc_info, *class_names) -> str:
    """A raised exception of one of these class names (by name: a checkpoint's own copy of the runtime
    raises its own classes) whose message is one line."""
    assert type(exc_info.value).__name__ in class_names, repr(exc_info.value)
    message = str(exc_info.value)
    assert "\n" not in message.strip(), message
    return message


def masked_product_float64(x, weight_t, tau, ends, bias=None):
    """The sparsity rule in float64, independent of the runtime: channel i of token t feeds segment s
    (output columns up to ends[s]) iff |x[t, i]| > tau[s, i], compared in float32 as the kernels do."""
    kept_abs = x.float().abs()
    cols, start = [], 0
    for s, end in enumerate(ends):
        xm = torch.where(kept_abs > tau[s], x.double(), torch.zeros((), dtype=torch.float64, device=x.device))
        cols.append(xm @ weight_t[:, start:end].double())
        start = end
    y = torch.cat(cols, dim=1)
    return y if bias is None else y + bias.double()


def write_checkpoint(model, family, folder: Path) -> None:
    """A whole model held in memory, written as a checkpoint (one shard, no tokenizer)."""
    write_checkpoint_files(model, family, None, folder)
    state = model.state_dict()
    save_sharded({n: state[n].detach() for n in saved_state_names(model)}, folder, 5 * 10**9, SAFETENSORS_METADATA)


def load_checkpoint(folder: Path) -> tuple[dict, dict]:
    """(config, every tensor of every shard)."""
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return json.loads((folder / "config.json").read_text()), tensors


def assert_same_checkpoint(a: Path, b: Path, other_source: bool = False) -> None:
    """Bitwise the same checkpoint; other_source: made from another copy of the model, so the winaconv
    section's source name and conversion id may differ."""
    config_a, tensors_a = load_checkpoint(a)
    config_b, tensors_b = load_checkpoint(b)
    if other_source:
        for config in (config_a, config_b):
            config["winaconv"].pop("base_model")
            config["winaconv"].pop("conversion_id")
    assert config_a == config_b
    assert sorted(tensors_a) == sorted(tensors_b)
    for name, tensor in tensors_a.items():  # bitwise: the arithmetic is the same, only the reading differs
        assert tensor.dtype == tensors_b[name].dtype and torch.equal(tensor, tensors_b[name]), name
    assert (a / "model.safetensors.index.json").is_file() == (b / "model.safetensors.index.json").is_file()


def fake_checkpoint(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "winaconv": {"format_version": 1}}))
    (folder / "model.safetensors").write_bytes(b"old")
    return folder


def trace(folder: Path) -> str:
    """A line that leaves folder/ran.txt when the module runs: the proof that the folder's code was executed
    (transformers runs a copy of it from its modules cache, hence the absolute path)."""
    return f"import pathlib; pathlib.Path({str(folder / 'ran.txt')!r}).write_text('the checkpoint code ran')\n"


def eval_args(folder, text):
    return ["eval", folder, "--text-file", text, "--window", 32, "--max-tokens", 64, "--sparsity", "0,0.5",
            "--device", "cpu"]


def max_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def reference_experts(x, top_k_index, top_k_weights, gate_up, down, tau_gate_up, tau_down, activation,
                      activation_dtype=torch.float64):
    """The rule in float64: each routed expert's masks from its thresholds, then dense products. The activation
    h may be rounded to `activation_dtype` first (the kernel hands it over in the model's dtype)."""
    width = down.shape[-1]
    x, gate_up, down = x.double(), gate_up.double(), down.double()
    tau_gate_up, tau_down = tau_gate_up.double(), tau_down.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for slot in range(top_k_index.shape[1]):
            e = int(top_k_index[t, slot])
            gate = gate_up[e, :width] @ (x[t] * (x[t].abs() > tau_gate_up[e, 0]))
            up = gate_up[e, width:] @ (x[t] * (x[t].abs() > tau_gate_up[e, 1]))
            h = (activation(gate) * up).to(activation_dtype).double()
            out[t] += float(top_k_weights[t, slot]) * (down[e] @ (h * (h.abs() > tau_down[e])))
    return out
