"""Publish a checkpoint folder to the Hugging Face Hub: check it, write its model card, create the
repo if needed, upload every file (large ones through LFS or Xet, as huggingface_hub decides).

HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE are honoured through huggingface_hub, which reads the
last two once, at import.
"""

from pathlib import Path

from ..errors import WinaconvError
from .inspection import hub_error_line, inspect_checkpoint
from .model_card import is_hub_id, write_model_card

IGNORE = ["__pycache__/*", "*.pyc", ".*"]


def resolve_token(token: str | None) -> str:
    """The token to push with: --token, else HF_TOKEN, else the one `hf auth login` saved."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise WinaconvError("cannot push: HF_HUB_OFFLINE is set (unset it to upload to the Hub)")
    token = token or get_token()
    if not token:
        raise WinaconvError("cannot push: no Hugging Face token (set HF_TOKEN, run `hf auth login`, or pass --token)")
    return token


def check_repo_id(repo_id: str) -> None:
    if not is_hub_id(repo_id):
        raise WinaconvError(f"invalid Hub repo id {repo_id!r}: expected namespace/name")


def push(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None, base_model: str | None = None, write_card: bool = True,
         say=print) -> str:
    """Upload `folder` to `repo_id`; returns the URL of the commit. Raises WinaconvError with one line
    on anything that stops it; success is only reported once the Hub has accepted the last commit."""
    from huggingface_hub import HfApi, constants

    folder = Path(folder)
    check_repo_id(repo_id)
    if not folder.is_dir():
        raise WinaconvError(f"checkpoint folder not found: {folder}")
    token = resolve_token(token)
    inspection = inspect_checkpoint(str(folder))
    if not inspection.ok:
        first = inspection.problems[0]
        more = f" (and {len(inspection.problems) - 1} more)" if len(inspection.problems) > 1 else ""
        raise WinaconvError(f"refusing to push a broken checkpoint: {first}{more}; run `winaconv inspect {folder}`")
    api = HfApi(endpoint=constants.ENDPOINT, token=token)
    where = f"{repo_id} at {constants.ENDPOINT}"
    step = "create the repo"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != constants.DEFAULT_REVISION:
            step = f"create branch {revision}"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        if write_card:  # once the token is known to work, before the upload
            step = "write the model card"
            path, written = write_model_card(folder, repo_id, base_model)
            say(f"model card {path} {'written' if written else 'kept (not written by winaconv)'}")
        step = "upload"
        say(f"uploading {folder} to {where}" + (f" (branch {revision})" if revision else ""))
        section = inspection.section or {}
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            ignore_patterns=IGNORE,
            commit_message=f"winaconv checkpoint ({section.get('method')}, transform {section.get('transform')})",
        )
    except WinaconvError:
        raise
    except Exception as exc:  # noqa: BLE001: every failure becomes one line, nothing is reported as done
        partial = " The repo may hold part of the files: run the push again to finish it." if step == "upload" else ""
        raise WinaconvError(f"push to {where} failed ({step}): {hub_error_line(exc)}.{partial}") from None
    return getattr(commit, "commit_url", None) or str(commit)
