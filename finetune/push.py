"""`finetune push`: a finished run's adapter, merged model or GGUF export, uploaded to the Hugging
Face Hub repo `hub_model_id`, when the user asks and only then.

A verb of its own, not a flag of train/merge/export: training never needs the network, a failed
upload is retried without redoing any work, and a user can evaluate first and push what passed.

Nothing is ever half uploaded: the files go up in one `upload_folder` call, which is one commit
(the Hub shows a commit's files only once the commit exists). Before any request it checks what
can be checked here: the folder to upload is complete, HF_HUB_OFFLINE is not set, a token
exists; then one request (who am I) proves the Hub is reachable and the token valid, before
the repo is created.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.config import FinetuneConfig
from finetune.errors import PushError
from finetune.hub import hub_offline

WHAT = ("adapter", "merged", "gguf")
# Never part of an adapter upload: other stages' outputs, partial writes, hidden files.
RUN_FOLDER_EXCLUDES = ["merged/**", "export/**", "interrupted/**", "runs/**", ".*", "**/.*"]


@dataclass
class PushPlan:
    repo_id: str
    folder: Path
    ignore_patterns: list[str]
    files: list[str]  # paths relative to `folder`, as they will be in the repo
    private: bool | None
    commit_message: str

    @property
    def size(self) -> int:
        return sum((self.folder / name).stat().st_size for name in self.files)


def plan_push(config: FinetuneConfig, run_dir: str | Path, what: str = "adapter") -> PushPlan:
    """What `push` would upload where, from the run folder alone (no network)."""
    run_dir = Path(run_dir)
    if what not in WHAT:
        raise PushError(f"--what {what}: choose one of {', '.join(WHAT)}")
    if not config.hub_model_id:
        raise PushError(
            "hub_model_id is not set: name the Hub repo to push to in the config "
            "(hub_model_id: you/model-name) or on the command line (--hub-model-id you/name)"
        )
    if what == "adapter":
        folder = run_dir
        _require(folder / "adapter_model.safetensors", "train first (finetune train CONFIG)")
        ignore = RUN_FOLDER_EXCLUDES + _checkpoints_left_out(run_dir, config.hub_strategy)
    elif what == "merged":
        folder = run_dir / "merged"
        _require(folder / "config.json", "merge first (finetune merge CONFIG)")
        ignore = [".*", "**/.*"]
    else:
        folder = run_dir / "export"
        if not any(folder.glob("*.gguf")):
            raise PushError(
                f"no .gguf file in {folder}: export first (finetune export CONFIG --format gguf)"
            )
        ignore = [".*", "**/.*"]
    return PushPlan(
        repo_id=config.hub_model_id,
        folder=folder,
        ignore_patterns=ignore,
        files=_files(folder, ignore),
        private=config.hub_private_repo,
        commit_message=f"finetune push: {what} of {run_dir.resolve().name}",
    )


def push(plan: PushPlan, log: Callable[[str], object] = print) -> str:
    """Upload `plan.files` to `plan.repo_id` in one commit; the commit's URL."""
    from huggingface_hub import HfApi, get_token

    if hub_offline():
        raise PushError(
            "HF_HUB_OFFLINE is set, so nothing can be uploaded; push from a machine with access "
            "to the Hugging Face Hub, with HF_HUB_OFFLINE unset (nothing was uploaded)"
        )
    if get_token() is None:
        raise PushError(
            "no Hugging Face token: log in with `hf auth login` or set HF_TOKEN (a token with "
            "write access), then push again (nothing was uploaded)"
        )
    api = HfApi()
    try:
        user = api.whoami()["name"]
    except Exception as exc:  # the client raises its HTTP errors and its transport's own
        raise PushError(_unreachable(exc)) from None
    log(
        f"pushing {len(plan.files)} files ({plan.size / 1e6:.1f} MB) from {plan.folder} to "
        f"{plan.repo_id} as {user}, in one commit"
    )
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=plan.repo_id,
            folder_path=plan.folder,
            ignore_patterns=plan.ignore_patterns,
            commit_message=plan.commit_message,
        )
    except Exception as exc:
        raise PushError(
            f"the upload to {plan.repo_id} failed ({type(exc).__name__}: "
            f"{_first_line(exc)}); no commit was made, so the repo is as it was: push again"
        ) from None
    return str(getattr(commit, "commit_url", commit))


def _require(path: Path, fix: str) -> None:
    if not path.is_file():
        raise PushError(f"{path} is missing: {fix}")


def _checkpoints_left_out(run_dir: Path, strategy: str) -> list[str]:
    """hub_strategy: end / every_save push no checkpoint, checkpoint the newest, all of them."""
    checkpoints = sorted(
        (p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    keep = {"all_checkpoints": checkpoints, "checkpoint": checkpoints[-1:]}.get(strategy, [])
    return [f"{p.name}/**" for p in checkpoints if p not in keep]


def _files(folder: Path, ignore: list[str]) -> list[str]:
    """The files `upload_folder` sends with these patterns (the client's own filter)."""
    from huggingface_hub.utils import filter_repo_objects

    names = sorted(
        str(path.relative_to(folder)).replace(os.sep, "/")
        for path in folder.rglob("*")
        if path.is_file()
    )
    return list(filter_repo_objects(names, ignore_patterns=ignore))


def _unreachable(exc: Exception) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return (
            "the Hugging Face Hub refused the token (401): log in again with `hf auth login` or "
            "set HF_TOKEN to a token with write access (nothing was uploaded)"
        )
    return (
        f"cannot reach the Hugging Face Hub ({type(exc).__name__}: {_first_line(exc)}); check "
        "the network (or HF_ENDPOINT) and push again (nothing was uploaded)"
    )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"
