"""The run folder: layout, safe creation (never clobber what a user has), metadata, metrics and the loss plot.

run_dir/
  adapter_model.safetensors, adapter_config.json   LoRA adapter (plain peft)
  tokenizer files + chat template                  the tokenizer training used
  config.yaml                                      resolved TrainConfig
  finechat.json                                    base model reference, status, final numbers
  heldout.jsonl                                    the held-out records evaluation used
  metrics.jsonl, loss.png                          per-step metrics and the loss curve
  checkpoints/checkpoint-N/                        complete checkpoints only (moved in atomically)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from finechat import __version__
from finechat.errors import UserError
from finechat.models import RUN_META

CHECKPOINTS = "checkpoints"
STAGING = ".staging"  # the Trainer writes checkpoints here; complete ones are renamed into checkpoints/
METRICS = "metrics.jsonl"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def check_output(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse early (before slow loading) when the run folder may not be used: an existing one needs --resume or
    --overwrite, and --overwrite only ever deletes a folder that finechat wrote."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pass one")
    if resume:
        if not last_checkpoint(run_dir):
            raise UserError(f"--resume: {run_dir} has no checkpoint to continue from; start it without --resume")
        return
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not overwrite:
            raise UserError(
                f"--output {run_dir} already exists; pass --resume to continue it or --overwrite to replace it"
            )
        if not (run_dir / RUN_META).is_file():
            raise UserError(
                f"--overwrite: {run_dir} is not a finechat run folder (no {RUN_META}); refusing to delete it"
            )


def create(run_dir: Path, resume: bool) -> None:
    """Make the run folder empty and ready (after check_output and once all inputs have been read)."""
    if not resume and (run_dir / RUN_META).is_file():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def write_meta(run_dir: Path, **fields: Any) -> None:
    """Update finechat.json (atomically) with the given fields."""
    path = run_dir / RUN_META
    meta = json.loads(path.read_text()) if path.is_file() else {"finechat_version": __version__}
    meta.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write(path, json.dumps(meta, indent=2) + "\n")


def atomic_write(path: Path, text: str) -> None:
    """Write a file through a temporary name and rename, so readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, if any."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    """The step number of a checkpoint folder."""
    m = _CKPT.match(path.name)
    assert m, path
    return int(m.group(1))


def publish_checkpoint(run_dir: Path, staged: Path, keep: int) -> Path:
    """Move a fully written checkpoint from staging into checkpoints/ (one rename) and drop the oldest beyond keep."""
    target = run_dir / CHECKPOINTS / staged.name
    target.parent.mkdir(exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staged, target)
    if keep:
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines after `step` (a resumed run repeats the steps after its checkpoint)."""
    path = run_dir / METRICS
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
        atomic_write(path, "".join(ln + "\n" for ln in lines))


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """Add one JSON line to metrics.jsonl."""
    with (run_dir / METRICS).open("a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All metric rows."""
    path = run_dir / METRICS
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def plot_loss(run_dir: Path) -> Path | None:
    """Draw loss.png from metrics.jsonl: training loss per step and held-out loss where measured (None, with a
    warning, where matplotlib is missing: a trained run is not lost over its picture)."""
    try:
        import matplotlib
    except ImportError:  # e.g. a bare GPU image; the numbers are in metrics.jsonl all the same
        logging.getLogger(__name__).warning("loss.png not drawn: matplotlib is not installed (pip install matplotlib)")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#3367d6")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="held-out loss", color="#e8710a")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def save_records(path: Path, records: list) -> None:
    """Write data Records as JSONL (text or messages per line), loadable again as --data."""
    lines = [json.dumps({k: v for k, v in asdict(r).items() if v is not None}, ensure_ascii=False) for r in records]
    atomic_write(path, "".join(ln + "\n" for ln in lines))
