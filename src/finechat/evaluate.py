"""Held-out perplexity: token-weighted cross-entropy over the tokens that train (assistant turns for chats)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from finechat.errors import UserError


@dataclass
class EvalResult:
    """Mean negative log-likelihood per token, its exponent, and how many tokens were scored."""

    loss: float
    perplexity: float
    tokens: int

    def as_dict(self) -> dict[str, float | int]:
        return {"loss": round(self.loss, 6), "perplexity": round(self.perplexity, 4), "tokens": self.tokens}


def perplexity(model, examples: list[dict[str, list[int]]], batch_size: int = 4) -> EvalResult:
    """Score token examples (from data.tokenize) with a causal LM; padding and masked tokens are not counted."""
    import torch
    import torch.nn.functional as F

    if not examples:
        raise UserError("evaluation data produced no tokens; pass more text with --data")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    # no_grad, not inference_mode: an FSDP-wrapped model (multi-GPU training) swaps its parameter views in place,
    # which inference tensors refuse (pytorch#113203).
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            width = max(len(e["input_ids"]) for e in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            attn = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for i, e in enumerate(batch):
                n = len(e["input_ids"])
                ids[i, :n] = torch.tensor(e["input_ids"])
                attn[i, :n] = 1
                mask = torch.tensor(e.get("assistant_masks", [1] * n), dtype=torch.bool)
                labels[i, :n] = torch.where(mask, ids[i, :n], -100)
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
            target = labels[:, 1:].to(device)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            total += float(nll)
            count += int((target != -100).sum())
    if was_training:
        model.train()
    if count == 0:
        raise UserError("evaluation data has no scored tokens (chat records need assistant replies)")
    loss = total / count
    return EvalResult(loss, math.exp(loss), count)


def evaluate(
    model_spec: str,
    data_spec: str | None,
    adapter: str | None = None,
    max_seq_length: int | None = None,
    max_docs: int = 0,
    quantize: str = "none",
) -> EvalResult:
    """Perplexity of a model (optionally with a run's adapter) on held-out data; with a run and no --data, the
    run's own held-out records (heldout.jsonl) are used."""
    from finechat import data, models

    run = Path(adapter) if adapter else None
    ref = models.resolve(model_spec)
    if run is None and ref.adapter is not None:
        run = ref.adapter
    if run is not None and not models.is_run_dir(run):
        raise UserError(f"--adapter {adapter}: not a finechat run folder (needs adapter_config.json and finechat.json)")
    if data_spec is None:
        if run is None:
            raise UserError(
                "--data is required unless --model or --adapter is a run folder (then its heldout.jsonl is used)"
            )
        data_spec = str(run / "heldout.jsonl")
    if max_seq_length is None:
        max_seq_length = _run_seq_length(run) if run else 512
    records = data.load_corpus(data_spec).records
    if max_docs:
        records = records[:max_docs]
    tokenizer = models.load_tokenizer(str(run) if run else ref.path)
    model = models.load_base(ref.path, quantize=quantize)
    if run is not None:
        model = models.load_adapter(model, run)
    return perplexity(model, data.tokenize(records, tokenizer, max_seq_length))


def _run_seq_length(run: Path) -> int:
    """The max_seq_length a run trained with (so its perplexity is scored on the same blocks)."""
    from finechat.config import load_config

    return load_config(str(run / "config.yaml")).max_seq_length
