"""Pushing to the Hub and converting from it, against a local fake Hub (winaconv/checkpoint/hub.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard

from winaconv_runtime.checkpoint_format import safetensors_metadata

from budgets import TINY_OPTIONS
from fake_hub import FakeHub
from models import CALIB_TEXT, tiny_source
from support import assert_one_line_error, one_error_line, run_cli

run = run_cli


TOKEN = "hf_fake_token_for_tests"


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A running fake Hub, with huggingface_hub in this process pointed at it."""
    from huggingface_hub import constants

    with FakeHub(token=TOKEN) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        # derived from HF_ENDPOINT at import too (download URLs); a fresh process gets both from the environment
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        yield server


def tiny_convert_args(source, out, calib):
    """`winaconv convert` of the tiny model on the CPU with the tiny budget (add levels, flags)."""
    return ["convert", source, "--out", out, "--calib-file", calib, "--device", "cpu", "--calib-tokens",
            TINY_OPTIONS["calib_tokens"], "--seq-len", TINY_OPTIONS["seq_len"], "--greedy-tokens",
            TINY_OPTIONS["greedy_tokens"]]


def test_push_subprocess_sends_every_file(ckpt, tmp_path):
    """The real CLI in a fresh interpreter, configured only through the environment."""
    with FakeHub(token=TOKEN) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
               "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "127.0.0.1,localhost", "PYTHONWARNINGS": "ignore"}
        env.pop("HF_HUB_DISABLE_XET", None)
        offline = subprocess.Popen([sys.executable, "-m", "winaconv.cli", "push", ckpt, "someone/offline"],
                                   env={**env, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        result = subprocess.run([sys.executable, "-m", "winaconv.cli", "push", ckpt, "someone/tiny-wina"],
                                env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"pushed {ckpt} to someone/tiny-wina: {hub.url}/someone/tiny-wina/commit/" in result.stderr

        received = hub.files("someone/tiny-wina")
        local = folder_files(ckpt)
        assert "README.md" in local and "model.safetensors" in local and "modeling_winaconv.py" in local
        assert sorted(received) == sorted(local)
        assert all(received[name] == content for name, content in local.items())
        assert ModelCard(received["README.md"].decode()).data.base_model == "example-org/tiny-llama"
        assert hub.repos["someone/tiny-wina"]["private"] is False
        methods = [f"{m} {p}" for m, p in hub.requests]
        assert "POST /api/repos/create" in methods and "POST /api/models/someone/tiny-wina/preupload/main" in methods

        out, err = offline.communicate(timeout=300)
        assert offline.returncode != 0
        assert "HF_HUB_OFFLINE" in one_error_line(err)
        assert "someone/offline" not in hub.repos


def test_push_large_files_through_lfs_to_a_private_branch(ckpt, hub, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    hub.lfs_threshold = 100_000  # model.safetensors (about 400 kB) goes through LFS, the rest in the commit
    result = run("push", ckpt, "someone/tiny-lfs", "--private", "--revision", "dev")
    assert result.exit_code == 0, result.output
    assert hub.repos["someone/tiny-lfs"]["private"] is True
    assert hub.files("someone/tiny-lfs", "main") == {}
    received, local = hub.files("someone/tiny-lfs", "dev"), folder_files(ckpt)
    assert received == local
    assert hub.commits[-1]["lfs"] == ["model.safetensors"]
    assert set(hub.commits[-1]["regular"]) == set(local) - {"model.safetensors"}
    assert any(m == "PUT" and p.startswith("/lfs-upload/") for m, p in hub.requests)
    assert ("POST", "/lfs-verify") in hub.requests

    # pushing again is idempotent: same files, the LFS object is not sent twice
    puts = sum(m == "PUT" for m, _ in hub.requests)
    assert run("push", ckpt, "someone/tiny-lfs", "--revision", "dev").exit_code == 0
    assert hub.files("someone/tiny-lfs", "dev") == local
    assert sum(m == "PUT" for m, _ in hub.requests) == puts


def test_push_with_a_wrong_token_is_one_line_and_not_done(ckpt, hub):
    result = run("push", ckpt, "someone/tiny", "--token", "hf_wrong")
    line = one_error_line(result.output)
    assert "401" in line and "someone/tiny" in line
    assert "pushed" not in result.output and "someone/tiny" not in hub.repos


def test_push_failing_mid_upload_is_not_reported_as_done(ckpt, hub):
    hub.fail["/commit/"] = 422  # a rejected commit (5xx would be retried with backoff for ~25 s)
    result = run("push", ckpt, "someone/tiny")
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output  # after the "winaconv: uploading ..." progress lines
    assert "failed (upload): HTTP 422" in errors[0] and "run the push again" in errors[0]
    assert "pushed" not in result.output and hub.files("someone/tiny") == {}


def test_push_without_any_token_is_one_line(ckpt, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    result = run("push", ckpt, "someone/tiny")
    assert "no Hugging Face token" in one_error_line(result.output)
    assert hub.requests == []


def test_push_refuses_a_broken_checkpoint(ckpt, hub):
    (ckpt / "kernels.py").unlink()
    result = run("push", ckpt, "someone/tiny")
    assert "refusing to push a broken checkpoint: kernels.py" in one_error_line(result.output)
    assert hub.requests == []
    assert "invalid Hub repo id" in one_error_line(run("push", ckpt, "not a repo").output)


def test_push_refuses_code_that_is_not_the_runtimes(ckpt, hub):
    """Issue 25: a checkpoint whose runtime copy was changed (or that carries other Python files) was pushed."""
    with open(ckpt / "sparse_linear.py", "a") as module:
        module.write("print('not the runtime')\n")
    result = run("push", ckpt, "someone/tiny")
    line = one_error_line(result.output)
    assert "refusing to push" in line and "sparse_linear.py: differs from the installed winaconv runtime" in line
    assert hub.requests == []


def test_convert_push_to(hub, tmp_path, checkpoints):
    source = tiny_source(checkpoints().parent)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    out = tmp_path / "converted"
    result = run(*tiny_convert_args(source, out, calib), "--greedy-step", TINY_OPTIONS["greedy_step"],
                 "--sparsity-levels", "0.25,0.5", "--method", "wina", "--push-to", "someone/converted", "--push-private")
    assert result.exit_code == 0, result.output
    assert hub.files("someone/converted") == folder_files(out)
    assert hub.repos["someone/converted"]["private"] is True
    assert ModelCard((out / "README.md").read_text()).data.tags[:2] == ["winaconv", "wina"]


def test_convert_push_to_fails_before_converting_when_offline(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "never"
    result = run("convert", tmp_path / "whatever", "--out", out, "--push-to", "someone/x")
    assert "HF_HUB_OFFLINE" in one_error_line(result.output)
    assert not out.exists() and hub.requests == []


def test_inspect_a_hub_repo_reads_headers_only(ckpt, hub):
    assert run("push", ckpt, "someone/tiny").exit_code == 0
    before = len(hub.requests)
    result = run("inspect", "someone/tiny")
    assert result.exit_code == 0, result.output
    assert "someone/tiny @ main (commit " in result.stdout and "sparsities at level 0.5" in result.stdout
    fetched = [p for m, p in hub.requests[before:] if m == "GET" and "/resolve/" in p]
    # the runtime's .py files are fetched, to compare them with the installed runtime; tokenizer.json is not
    assert not any(p.endswith("tokenizer.json") for p in fetched), fetched
    assert any(p.endswith("/modeling_winaconv.py") for p in fetched), fetched

    # damage the stored weights: the header read over HTTP must show it
    from safetensors.torch import load, save

    files = hub.repos["someone/tiny"]["branches"]["main"]
    tensors = load(files["model.safetensors"])
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    files["model.safetensors"] = save(tensors, metadata=safetensors_metadata(ckpt / "model.safetensors"))
    result = run("inspect", "someone/tiny")
    assert result.exit_code == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("problem:")] == [
        "problem: model.layers.1.self_attn.o_proj.weight: missing (the config expects a tensor of shape [64, 64])"
    ]
    assert "404" in one_error_line(run("inspect", "someone/absent").output)


def test_sharded_checkpoint_pushes_whole(hub, tmp_path, checkpoints):
    """Every shard carries the format metadata, so push (and convert --push-to) accept a sharded checkpoint."""
    source = tiny_source(checkpoints().parent)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    out = tmp_path / "sharded"
    result = run(*tiny_convert_args(source, out, calib), "--sparsity-levels", "0.5", "--max-shard-size", "40KB",
                 "--push-to", "someone/sharded")
    assert result.exit_code == 0, result.output
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert hub.files("someone/sharded") == folder_files(out)


def test_a_checkpoint_given_by_hub_id_is_not_converted_again(ckpt, hub, tmp_path):
    assert run("push", ckpt, "someone/already-sparse").exit_code == 0
    out = tmp_path / "again"
    result = run("convert", "someone/already-sparse", "--out", out, "--calib-file", ckpt / "config.json")
    assert_one_line_error(result, "already a winaconv checkpoint", after_progress=True)
    assert not out.exists()


def test_a_hub_model_converts_layer_by_layer_from_its_snapshot(hub, tmp_path):
    """The weights of a Hub model are downloaded once (safetensors and index only) and read layer by layer:
    the checkpoint equals the one converted from the same files in a local folder."""
    from huggingface_hub import HfApi

    from support import load_checkpoint

    source = tiny_source(tmp_path)
    api = HfApi(token=TOKEN)
    api.create_repo("someone/tiny-llama")
    api.upload_folder(folder_path=source, repo_id="someone/tiny-llama")
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    arguments = ["--sparsity-levels", "0.5", "--max-shard-size", "60KB"]
    # a fresh process: transformers' tokenizer loading reads the endpoint from the environment
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    done = subprocess.run([sys.executable, "-m", "winaconv.cli",
                           *map(str, tiny_convert_args("someone/tiny-llama", tmp_path / "from-hub", calib)), *arguments],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert any(p.name.endswith(".safetensors") for p in (tmp_path / "hub-cache").rglob("*"))  # the snapshot read
    result = run(*tiny_convert_args(source, tmp_path / "from-folder", calib), *arguments)
    assert result.exit_code == 0, result.output
    hub_config, hub_tensors = load_checkpoint(tmp_path / "from-hub")
    folder_config, folder_tensors = load_checkpoint(tmp_path / "from-folder")
    assert hub_config["winaconv"].pop("base_model")["id"] == "someone/tiny-llama"
    folder_config["winaconv"].pop("base_model")
    # the conversion id derives from the source's identity too (a Hub commit here, file sizes and times there)
    assert hub_config["winaconv"].pop("conversion_id") != folder_config["winaconv"].pop("conversion_id")
    assert hub_config == folder_config and sorted(hub_tensors) == sorted(folder_tensors)
    assert all(torch.equal(t, folder_tensors[n]) for n, t in hub_tensors.items())
