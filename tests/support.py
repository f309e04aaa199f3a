"""Helpers shared by the tests (not a test module): running the CLI, the one-line-error assertions, the
float64 reference of the sparsity rule, and the tiny random Llama with its own byte-level BPE tokenizer that the inspect and Hub tests convert."""

import json
from pathlib import Path

import torch

from winaconv_runtime.checkpoint_format import SAFETENSORS_METADATA
from winaconv.convert.write import save_sharded, saved_state_names, write_checkpoint_files

# convert budgets: CLI arguments for tiny random models, and ConvertOptions fields for tiny_checkpoint
TINY = ["--calib-tokens", "256", "--seq-len", "32", "--greedy-tokens", "64", "--sparsity-levels", "0.25,0.5"]
TINY_OPTIONS = dict(calib_tokens=256, seq_len=32, greedy_tokens=32, greedy_step=0.05, sparsity_levels=(0.25, 0.5),
                    default_sparsity=0.5)
CALIB_TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog while the calibration text keeps on going, "
    f"with numbers like {i * 37 % 101} and words such as sparsity, threshold, projection and layer."
    for i in range(60)
)


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


def tiny_source(root: Path) -> Path:
    """A random Llama (hidden 64, 2 layers) with a small BPE tokenizer, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = root / "tiny-llama"
    if (folder / "config.json").is_file():
        return folder
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([CALIB_TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


_MADE: dict[tuple[Path, str], Path] = {}


def tiny_checkpoint(root: Path, transform: str = "global") -> Path:
    """A converted checkpoint of tiny_source (made once per root and transform); copy it before breaking it."""
    from winaconv.convert import ConvertOptions, convert

    if (root, transform) not in _MADE:
        calib = root / "calib.txt"
        calib.write_text(CALIB_TEXT)
        out = root / f"ckpt-{transform}"
        convert(ConvertOptions(model=str(tiny_source(root)), out=out, method="wina", transform=transform,
                               calib_file=str(calib), device="cpu", **TINY_OPTIONS), say=lambda m: None)
        config = json.loads((out / "config.json").read_text())
        config["winaconv"]["base_model"]["id"] = "example-org/tiny-llama"  # as a Hub-converted model records it
        (out / "config.json").write_text(json.dumps(config, indent=2))
        _MADE[root, transform] = out
    return _MADE[root, transform]


def write_checkpoint(model, family, folder: Path) -> None:
    """A whole model held in memory, written as a checkpoint (one shard, no tokenizer)."""
    write_checkpoint_files(model, family, None, folder)
    state = model.state_dict()
    save_sharded({n: state[n].detach() for n in saved_state_names(model)}, folder, 5 * 10**9, SAFETENSORS_METADATA)
