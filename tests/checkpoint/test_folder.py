"""The checkpoint folder is written atomically: --overwrite replaces only an old checkpoint, staging folders of dead
runs go, signals and write failures leave nothing behind (winaconv/checkpoint/folder.py)."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from winaconv.checkpoint.folder import STAGING_MARKER, atomic_folder, check_output_dir, remove_stale_staging
from winaconv.checkpoint.inspection import inspect_checkpoint
from winaconv.convert.write import parse_shard_size
from winaconv.errors import WinaconvError

from budgets import TINY
from models import CALIB_TEXT, tiny_source
from support import assert_one_line_error, fake_checkpoint, run_cli

run = run_cli


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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
        from winaconv.interrupts import interrupts_unwind
        from winaconv.errors import WinaconvError
        out = Path({str(tmp_path / 'ckpt')!r})
        try:
            with interrupts_unwind(), atomic_folder(out, False) as staging:
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


def test_convert_out_that_is_a_symlink_is_refused(ckpt, checkpoints, tmp_path):
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    result = run_cli("convert", tiny_source(checkpoints().parent), "--out", link, "--overwrite", "--calib-file", calib,
                     *TINY)
    assert_one_line_error(result, "is a symbolic link", "give the folder itself")
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before  # no staging marker inside the target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "ckpt", "link"] and link.is_symlink()
