"""Issue 25: what a checkpoint folder can make winaconv do. Its Python files are never run by the command line
unless the user opts in; a shard from another conversion and an implausible threshold are caught by
`inspect`, by loading and by the commands; the README's tokenizer line loads without asking to run code.
Checkpoints are the tiny converted ones (support.tiny_checkpoint), copied before they are changed."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import assert_one_line_error, edit_config, problem_lines as problems, run_cli

REPO = Path(__file__).resolve().parents[1]


def trace(folder: Path) -> str:
    """A line that leaves folder/ran.txt when the module runs: the proof that the folder's code was executed
    (transformers runs a copy of it from its modules cache, hence the absolute path)."""
    return f"import pathlib; pathlib.Path({str(folder / 'ran.txt')!r}).write_text('the checkpoint code ran')\n"


def eval_args(folder, text):
    return ["eval", folder, "--text-file", text, "--window", 32, "--max-tokens", 64, "--sparsity", "0,0.5",
            "--device", "cpu"]


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


def test_a_shard_from_another_conversion_is_refused(checkpoint_copy, held_out_text):
    """Same architecture and tensor names (global and pca of one model), another conversion."""
    from transformers import AutoModelForCausalLM

    folder = checkpoint_copy("global")
    shutil.copyfile(checkpoint_copy("pca", "other") / "model.safetensors", folder / "model.safetensors")
    found = problems(run_cli("inspect", folder))
    assert len(found) == 1 and "model.safetensors belongs to another conversion" in found[0], found
    assert_one_line_error(run_cli(*eval_args(folder, held_out_text)), "belongs to another conversion")
    with pytest.raises(ValueError, match="belongs to another conversion"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_a_checkpoint_saved_again_by_transformers_still_loads(checkpoints, tmp_path):
    """save_pretrained writes no conversion id into the files: loading accepts files without one (inspect
    reports them), only another conversion's id is refused."""
    from winaconv.use.loading import installed_class

    folder = checkpoints("global")
    cls = installed_class(json.loads((folder / "config.json").read_text()))
    cls.from_pretrained(folder).save_pretrained(tmp_path / "saved-again")
    again = cls.from_pretrained(tmp_path / "saved-again", sparsity=0.25)
    assert again.sparsity == 0.25


def test_a_repeated_conversion_gets_the_same_id(checkpoints, tmp_path):
    from support import CALIB_TEXT, TINY_OPTIONS, tiny_source
    from winaconv.convert import ConvertOptions, convert
    from winaconv_runtime.checkpoint_format import safetensors_metadata

    first = checkpoints("none")
    calib = first.parent / "calib.txt"  # the same file: its path is one of the options
    assert calib.read_text() == CALIB_TEXT
    again = tmp_path / "again"
    convert(ConvertOptions(model=str(tiny_source(first.parent)), out=again, method="wina", transform="none",
                           calib_file=str(calib), device="cpu", **TINY_OPTIONS), say=lambda m: None)
    ids = {json.loads((folder / "config.json").read_text())["winaconv"]["conversion_id"] for folder in (first, again)}
    ids |= {safetensors_metadata(folder / "model.safetensors")["winaconv_conversion_id"] for folder in (first, again)}
    assert len(ids) == 1 and len(next(iter(ids))) == 16


def test_a_threshold_above_every_calibration_score_is_refused(checkpoint_copy, held_out_text):
    from transformers import AutoModelForCausalLM

    folder = checkpoint_copy()
    edit_config(folder, lambda c: c["winaconv"]["levels"]["0.5"]["thresholds"][1].__setitem__(4, 1e30))
    found = problems(run_cli("inspect", folder))
    assert len(found) == 1 and "level 0.5 layer 1 gate: threshold 1e+30 is above the largest score" in found[0], found
    assert_one_line_error(run_cli(*eval_args(folder, held_out_text)), "level 0.5 layer 1 gate: threshold 1e+30")
    with pytest.raises(ValueError, match="threshold 1e"):
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


def test_a_lower_level_with_a_higher_threshold_is_reported(checkpoint_copy):
    """Thresholds grow with sparsity on one score distribution: a level that drops less with a higher threshold
    cannot come from calibration (found by inspect also where score_max is not recorded)."""
    folder = checkpoint_copy()
    config = json.loads((folder / "config.json").read_text())
    levels = config["winaconv"]["levels"]
    layer, index = next((layer, i) for layer, row in enumerate(levels["0.5"]["sparsities"]) for i, s in enumerate(row)
                        if s > levels["0.25"]["sparsities"][layer][i])
    levels["0.25"]["thresholds"][layer][index] = levels["0.5"]["thresholds"][layer][index] * 2
    del config["winaconv"]["score_max"]
    (folder / "config.json").write_text(json.dumps(config))
    found = problems(run_cli("inspect", folder))
    assert len(found) == 2 and found[0] == "problem: config.json: winaconv section lacks 'score_max'", found
    assert found[1].startswith(f"problem: config.json: layer {layer} ") and "level 0.25's threshold" in found[1]
