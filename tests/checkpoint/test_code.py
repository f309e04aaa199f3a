"""The Python code a checkpoint carries: commands never run code that differs from the installed runtime, and inspect
reports it (winaconv/checkpoint/code.py)."""

import json
import re
import subprocess
import sys
from pathlib import Path

from support import assert_one_line_error, edit_config, eval_args, run_cli, trace
from support import problem_lines as problems

REPO = Path(__file__).resolve().parents[2]


def test_commands_refuse_modified_checkpoint_code_and_never_run_it(checkpoint_copy, held_out_text):
    folder = checkpoint_copy()
    with open(folder / "modeling_winaconv.py", "a") as module:
        module.write(trace(folder))
    found = problems(run_cli("inspect", folder))
    assert found == ["problem: modeling_winaconv.py: differs from the installed winaconv runtime's modeling_winaconv.py"]
    for args in (eval_args(folder, held_out_text), ["generate", folder, "Once upon a time", "--max-new-tokens", 4],
                 ["bench", folder, "--new-tokens", 4, "--prompt-tokens", 8]):
        line = assert_one_line_error(run_cli(*args), "modeling_winaconv.py: differs", "--trust-checkpoint-code")
        assert not (folder / "ran.txt").exists(), (args, line)
    # the explicit opt-in runs the folder's code, as it says
    result = run_cli(*eval_args(folder, held_out_text), "--trust-checkpoint-code")
    assert result.exit_code == 0, result.output
    assert (folder / "ran.txt").read_text() == "the checkpoint code ran"


def test_unknown_python_files_and_foreign_auto_maps_are_reported(checkpoint_copy):
    folder = checkpoint_copy()
    (folder / "helpers.py").write_text(trace(folder))
    edit_config(folder, lambda c: c["auto_map"].update(AutoModelForCausalLM="helpers.Model", AutoTokenizer="helpers.T"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((folder / "tokenizer_config.json").read_text()), "auto_map": {"AutoTokenizer": ["helpers.T", None]}}))
    found = problems(run_cli("inspect", folder))
    assert found == [
        "problem: helpers.py: a Python file that is not part of winaconv's runtime",
        "problem: config.json: auto_map AutoTokenizer names 'helpers.T', which is not winaconv's",
        "problem: config.json: auto_map AutoModelForCausalLM names 'helpers.Model', not the runtime's "
        "'modeling_winaconv.WinaLlamaForCausalLM'",
        'problem: tokenizer_config.json: auto_map names tokenizer code ({"AutoTokenizer": ["helpers.T", null]}), '
        "which is not winaconv's",
    ], found
    assert not (folder / "ran.txt").exists()


def test_an_unmodified_checkpoint_is_built_from_the_installed_runtime(checkpoints):
    from winaconv.use.loading import find_model, load_model

    ref = find_model(str(checkpoints("exact")))
    loaded = load_model(ref)
    assert type(loaded.model).__module__ == "winaconv_runtime.modeling_winaconv"  # not transformers_modules.*
    assert type(loaded.model).__name__ == "WinaExactLlamaForCausalLM" and not ref.run_folder_code


def test_the_readme_tokenizer_line_never_asks_to_run_code(checkpoints):
    """The README's `AutoTokenizer.from_pretrained(...)` line, run on an exact-transform checkpoint (whose
    config class lives in the folder) with no terminal: it used to ask "run the custom code? [y/N]"."""
    readme = (REPO / "README.md").read_text()
    line = next(l.strip() for l in readme.splitlines() if "= AutoTokenizer.from_pretrained(" in l)
    code = "from transformers import AutoTokenizer\n" + re.sub(r'"llama3-wina"', repr(str(checkpoints("exact"))), line)
    code += "\nprint(type(tokenizer).__name__, len(tokenizer('hello world').input_ids))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[y/N]" not in done.stdout + done.stderr
