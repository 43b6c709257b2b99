"""Helpers every benchmark shares: freeing and synchronizing the GPU, and a tokenizer for random-weight models."""

from __future__ import annotations

import gc
import json
from contextlib import suppress
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from finechat.errors import UserError


def free_memory() -> None:
    """Drop unreferenced tensors and return cached GPU memory, so the next measurement starts clean."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    """Wait for queued GPU work (no-op on CPU), so wall-clock timings cover it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def save_word_tokenizer(folder: Path, vocab_size: int) -> None:
    """A tokenizer whose tokens are the words w3..w{vocab_size-1} (plus <unk>, <s>, </s>): one word, one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.save_pretrained(folder)


def versions(names: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the named packages (missing ones left out), recorded with every result."""
    found = {}
    for name in names:
        with suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def write_json(path: Path, result: dict[str, Any]) -> None:
    """Write a result file (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def device_name(arch: str) -> str:
    """The GPU's name, or "cpu" for the tiny dry-run architecture; other architectures need CUDA."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    if arch != "tiny":
        raise UserError(f"--arch {arch} needs a CUDA GPU; use --arch tiny for a CPU dry run")
    return "cpu"
