"""Helpers every benchmark shares: freeing and synchronizing the GPU, and a tokenizer for random-weight models."""

from __future__ import annotations

import gc
from pathlib import Path


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
