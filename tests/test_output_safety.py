"""Issue 10: convert never deletes what is not its own old checkpoint, and checks its output before loading."""

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from winaconv.checkpoint.folder import STAGING_MARKER, atomic_folder, check_output_dir, remove_stale_staging
from winaconv.convert.write import parse_shard_size
from winaconv.errors import WinaconvError
from winaconv.checkpoint.inspection import inspect_checkpoint

from support import TINY, assert_one_line_error, run_cli


run = run_cli


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_checkpoint(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "winaconv": {"format_version": 1}}))
    (folder / "model.safetensors").write_bytes(b"old")
    return folder


def test_overwrite_refuses_everything_but_an_old_checkpoint(tmp_path, tiny_folder):
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print('user code')")
    (project / "data").mkdir()
    (project / "data" / "notes.txt").write_text("user data")
    # an old checkpoint with one user file in it, of the kinds a checkpoint also holds (.txt, .json, .py)
    user_files = {"my-notes.md": "keep me", "notes.txt": "keep me", "results.json": "{}", "train.py": "pass",
                  "__pycache__/notes.txt": "not bytecode", "data/rows.csv": "1,2"}
    with_extra = []
    for i, (name, text) in enumerate(user_files.items()):
        folder = fake_checkpoint(tmp_path / f"ckpt-with-user-file-{i}")
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
        with_extra.append((folder, name.split("/")[0]))
    source = tiny_folder("llama")
    guarded = [project, source] + [folder for folder, _ in with_extra]
    before = {f: snapshot(f) for f in guarded}

    cases = [(project, "not a winaconv checkpoint"), (source, "source model"), (source.parent, "source model")]
    for out, words in cases + with_extra:
        assert_one_line_error(run("convert", source, "--out", out, "--overwrite", *TINY), *words)
    with pytest.raises(WinaconvError, match="source model"):
        check_output_dir(source, overwrite=True, source=source)
    assert {f: snapshot(f) for f in guarded} == before
    check_output_dir(fake_checkpoint(tmp_path / "old"), overwrite=True, source=source)  # the one thing it replaces


def test_output_problems_found_before_loading(tmp_path, tiny_folder):
    source = tiny_folder("llama")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["--out", a_file / "ckpt"], ["is a file"]),
        (["--out", tmp_path / "o", "--max-shard-size", "abc"], ["--max-shard-size"]),
        (["--out", tmp_path / "o", "--greedy-step", "0"], ["--greedy-step"]),
        (["--out", tmp_path / "o", "--greedy-step", "-0.5"], ["--greedy-step"]),
        (["--out", tmp_path / "o", "--device", "tpu"], ["--device"]),
        (["--out", tmp_path / "o", "--sparsity-levels", "0"], ["at least one level above 0"]),
    ]
    for extra, words in cases:
        assert_one_line_error(run("convert", source, *TINY, *extra), *words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert parse_shard_size("5MB") == 5 * 10**6 and parse_shard_size("2GiB") == 2 * 2**30


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(WinaconvError, match="not writable"):
        check_output_dir(locked / "ckpt", overwrite=False)


@pytest.fixture
def read_only_folder(tmp_path):
    """A real read-only file system (a tmpfs mounted ro): EROFS, which root cannot write past either."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    except OSError as exc:  # no mount command
        pytest.skip(f"cannot mount a read-only tmpfs here: {exc}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_read_only_file_system_is_refused_before_loading(read_only_folder, tiny_folder):
    result = run("convert", tiny_folder("llama"), "--out", read_only_folder / "ckpt", *TINY)
    assert_one_line_error(result, "read-only file system")
    assert "loading" not in result.output


def test_converting_a_checkpoint_again_is_refused(tmp_path):
    old = fake_checkpoint(tmp_path / "old")
    assert_one_line_error(run("convert", old, "--out", tmp_path / "new", *TINY), "already a winaconv checkpoint")


def test_sharded_checkpoint_is_whole_readable_and_replaceable(tmp_path, tiny_folder, calib_file):
    out = tmp_path / "ckpt"
    args = ["convert", tiny_folder("llama"), "--out", out, "--calib-file", calib_file, "--device", "cpu",
            *TINY, "--max-shard-size", "5MB"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert inspect_checkpoint(str(out)).problems == []
    assert run("inspect", out).exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask for p in shards)

    result = run(*args, "--overwrite")  # a previous winaconv checkpoint: replaced
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_stale_staging_of_dead_runs_is_removed(tmp_path):
    out = tmp_path / "ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ckpt.partial-{dead.stdout.strip()}-abcd"
    stale.mkdir()
    (stale / STAGING_MARKER).touch()
    live = tmp_path / f".ckpt.partial-{os.getpid()}-abcd"
    live.mkdir()
    (live / STAGING_MARKER).touch()
    not_ours = tmp_path / ".ckpt.partial-1-user"
    not_ours.mkdir()
    assert remove_stale_staging(out) == [stale]
    assert live.is_dir() and not_ours.is_dir()


def _run_staged(tmp_path, body):
    script = textwrap.dedent(f"""
        import os, resource, signal, sys
        from pathlib import Path
        from winaconv.checkpoint.folder import atomic_folder
        from winaconv.cli import terminate_like_interrupt
        from winaconv.errors import WinaconvError
        out = Path({str(tmp_path / 'ckpt')!r})
        try:
            with terminate_like_interrupt(), atomic_folder(out, False) as staging:
        {textwrap.indent(textwrap.dedent(body), ' ' * 16)}
        except KeyboardInterrupt:
            sys.exit(130)
        except WinaconvError as exc:
            print(exc)
            sys.exit(1)
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ)


def test_sigterm_removes_the_staging_folder(tmp_path):
    done = _run_staged(tmp_path, """
        (staging / "model.safetensors").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
    """)
    assert done.returncode == 130, done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", ["python", "safetensors"])
def test_write_failure_is_one_line_and_removes_staging(tmp_path, writer):
    # a real write failure (EFBIG from a file size limit) stands in for a full disk, met by Python's own
    # writes and by the shard writer's
    write = {"python": '(staging / "config.json").write_bytes(b"x" * 1_000_000)',
             "safetensors": 'save_sharded({"w": torch.zeros(250_000)}, staging, 10**9, {})'}[writer]
    done = _run_staged(tmp_path, f"""
        import torch
        from winaconv.convert.write import save_sharded
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        {write}
    """)
    assert done.returncode == 1, done.stderr
    assert done.stdout.strip().startswith("writing") and "partial output was removed" in done.stdout
    assert len(done.stdout.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_output_that_changed_during_the_conversion_is_left_alone(tmp_path):
    """The final check (--out may have changed during hours of conversion) refuses to replace a folder
    that now holds user files, and keeps the finished checkpoint where the message says."""
    out = fake_checkpoint(tmp_path / "ckpt")
    with pytest.raises(WinaconvError, match="finished checkpoint was left in") as error:
        with atomic_folder(out, overwrite=True) as staging:
            (staging / "config.json").write_text("{}")
            (out / "thesis.tex").write_text("user data")  # arrives while the conversion runs
    assert (out / "thesis.tex").read_text() == "user data" and (out / "model.safetensors").read_bytes() == b"old"
    left = Path(str(error.value).rsplit(" ", 1)[-1])
    assert (left / "config.json").is_file() and not (left / STAGING_MARKER).exists()
    # next to --out and not hidden (issue 25: it stayed in the hidden staging folder, never looked at again)
    assert left.parent == out.parent and not left.name.startswith(".") and left.name.startswith("ckpt")


def test_calibration_text_that_is_not_text_is_refused(tmp_path):
    from winaconv.convert.calibration_data import read_text_file

    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(WinaconvError, match="not UTF-8 text"):
        read_text_file(binary)
    no_text = tmp_path / "rows.jsonl"
    no_text.write_text('{"id": 1}\n{"id": 2}\n')
    with pytest.raises(WinaconvError, match="'text' field"):
        read_text_file(no_text)
    fine = tmp_path / "ok.txt"
    fine.write_text("Plain prose, with a tab\tand a few accents: café, naïve.\n")
    assert read_text_file(fine) == [fine.read_text()]


def test_source_folder_problems_are_one_line(tmp_path):
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{not json")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = tmp_path / "out"
    result = run("convert", bad_json, "--out", out, *TINY)
    assert_one_line_error(result, "not valid JSON")
    assert "HF_HUB_OFFLINE" not in result.output
    assert_one_line_error(run("convert", no_weights, "--out", out, *TINY), "no safetensors weights")
    assert not out.exists()


def test_source_without_tokenizer_and_corrupt_weights_are_one_line(tmp_path, tiny_folder):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny_folder("llama") / name).read_bytes())
    assert_one_line_error(run("convert", no_tokenizer, "--out", tmp_path / "out", *TINY), "tokenizer", after_progress=True)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for entry in tiny_folder("llama").iterdir():
        (corrupt / entry.name).write_bytes(entry.read_bytes())
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a download cut in half
    text = tmp_path / "held_out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    assert_one_line_error(run("eval", corrupt, "--text-file", text, "--window", "32", "--max-tokens", "64"), "cannot load",
                          after_progress=True)
    assert_one_line_error(run("convert", corrupt, "--out", tmp_path / "out", *TINY), "cannot load the weights",
                          after_progress=True)
    assert not (tmp_path / "out").exists()


def test_default_sparsity_follows_the_stored_levels(tmp_path):
    from winaconv.convert import ConvertOptions
    from winaconv.convert.checks import validate

    options = ConvertOptions(model="m", out=tmp_path / "o", sparsity_levels=(0.25, 0.4))
    assert validate(options) == ([0.25, 0.4], 0.4) and options.default_sparsity is None
    options = ConvertOptions(model="m", out=tmp_path / "o", sparsity_levels=(0.25, 0.5, 0.65))
    assert validate(options).default_sparsity == 0.5


def test_chosen_default_sparsity_is_said(tmp_path, tiny_folder, calib_file):
    result = run("convert", tiny_folder("llama"), "--out", tmp_path / "ckpt", "--calib-file", calib_file,
                 "--device", "cpu", *TINY[:-1], "0.25,0.4")
    assert result.exit_code == 0, result.output
    assert "default sparsity: 0.4" in result.output
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["winaconv"]["default_sparsity"] == 0.4


def test_eval_of_an_exact_checkpoint_never_prompts(tiny_folder, calib_file, tmp_path):
    """Case 5: its tokenizer was loaded without trust_remote_code, so transformers asked on stdout whether
    to run the folder's code: --json stopped parsing, and a terminal waited for input."""
    out = tmp_path / "ckpt"
    result = run("convert", tiny_folder("llama"), "--out", out, "--calib-file", calib_file, "--device", "cpu",
                 *TINY, "--transform", "exact")
    assert result.exit_code == 0, result.output
    text = tmp_path / "held_out.txt"
    text.write_text("\n\n".join(["The quick brown fox jumps over the lazy dog."] * 40))
    done = subprocess.run([sys.executable, "-m", "winaconv.cli", "eval", str(out), "--text-file", str(text),
                           "--window", "64", "--max-tokens", "256", "--sparsity", "0,0.5", "--json"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["transform"] == "exact" and len(report["results"]) == 2


def test_help_does_not_import_torch():
    """Case 10: every command, --help included, took 5-7 s because torch, transformers and every model
    family were imported up front."""
    probe = "import sys, winaconv.cli; sys.exit(sorted({'torch', 'transformers'} & set(sys.modules)) != [])"
    assert subprocess.run([sys.executable, "-c", probe], timeout=120).returncode == 0
    for command in ("convert", "eval", "inspect", "push", "generate", "bench"):
        done = subprocess.run([sys.executable, "-m", "winaconv.cli", command, "--help"], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0 and "Usage:" in done.stdout, (command, done.stderr[-500:])
