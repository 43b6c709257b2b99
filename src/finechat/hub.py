"""Uploading run folders and merged models to the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

from finechat.errors import UserError


def push(folder: Path, repo_id: str) -> str:
    """Upload a folder (checkpoints excluded) to a Hub model repo; returns its URL. Fails with a one-line error
    (the folder stays as written) when offline or not logged in."""
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo_id, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, ignore_patterns=["checkpoints/*", ".staging/*"])
    except Exception as e:  # network, auth and validation errors all arrive as different types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"--push-to-hub {repo_id}: upload failed ({msg}); {folder} is saved, retry when online"
        ) from None
    return f"https://huggingface.co/{repo_id}"
