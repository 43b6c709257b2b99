"""Packed chat records: several records in one row of a batch, each attending only to itself.

`finechat train --packing` has TRL pack the tokenized records best-fit-decreasing into rows of max_seq_length tokens
and flatten each batch into one row without padding between records ("padding-free"): TRL's collator gives the
records' boundaries (cu_seq_lens_q) and each token's position within its record (position_ids). Here:

- `PackedBatches` wraps that collator so that the padding at the row's end is one segment, not one segment per pad
  token (TRL gives every pad position 0, which starts a new record); the number of segments then stays near the
  number of records, which the attention kernel's grid and the layer graphs' buffers are sized by;
- `Segments` carries the boundaries and positions to the fast path's decoder layers (finechat.fastpath), which take
  the rotary tables at each token's own position and run attention per record: flash attention's variable-length
  kernel on CUDA (one launch for the whole row), one causal attention per record elsewhere.

On the plain path (CPU, FSDP, evaluation) the batch goes to the model as TRL made it: transformers builds a
block-diagonal causal mask from the position ids, which computes the same attention."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

# the keys of TRL's padding-free batches that describe the records (a Segments object replaces them on the fast path)
KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
MIN_CAPACITY = 16  # segments a graphed batch has room for, at least (a power of two from there)
MIN_BOUND = 128  # the longest record a graphed batch allows for, at least (a power of two from there)


@dataclass
class Segments:
    """The records of one flattened row: cu (int32 [n + 1], cumulative record lengths, on the row's device; the last
    is the row's length), longest (the longest record's length, an upper bound is fine) and positions (int64
    [1, tokens]: each token's position in its record; None in a graph's own copy, whose rotary tables are filled
    already)."""

    cu: torch.Tensor
    longest: int
    positions: torch.Tensor | None = None
    _rotary: tuple[Any, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, batch: dict[str, Any]) -> Segments | None:
        """The segments of a padding-free batch from TRL's collator (None for other batches)."""
        cu = batch.get("cu_seq_lens_q")
        if cu is None or batch.get("position_ids") is None:
            return None
        return cls(cu=cu, longest=int(batch["max_length_q"]), positions=batch["position_ids"])

    def rotary(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables at each token's position in its record, from the tables of positions 0..tokens-1 that
        the model made for the row (a look-up: the same values the model computes for those positions). Made once
        per batch; every layer gets the same tables."""
        if self.positions is None:
            return cos, sin
        if not self._rotary or self._rotary[0] is not cos:
            index = self.positions[0].to(cos.device)
            self._rotary = (cos, cos[:, index], sin[:, index])
        return self._rotary[1], self._rotary[2]

    def bucket(self) -> tuple[int, int]:
        """(segments, longest record) rounded up to powers of two: what a layer graph of these rows is sized for, so
        that batches of similar records share one graph."""
        return _power_of_two(self.cu.numel() - 1, MIN_CAPACITY), _power_of_two(self.longest, MIN_BOUND)


def _power_of_two(n: int, least: int) -> int:
    return max(least, 1 << max(n - 1, 0).bit_length())


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float, kv_groups: int
) -> torch.Tensor:
    """Causal attention within each segment of a flattened row. q: [1, heads, tokens, head_dim], k and v:
    [1, kv heads, tokens, head_dim] (views of [tokens, heads, head_dim] memory, as the fast path makes them); the
    result has q's shape, over [tokens, heads, head_dim] memory (as SDPA's flash kernel returns it).

    CUDA with 16-bit tensors: flash attention's variable-length kernel, one launch, grouped KV heads as they are;
    its derivative is registered with PyTorch (autograd runs its backward kernel). It reads the boundaries from
    device memory, so a CUDA graph can replay it over other records of the same bucket. Elsewhere: causal SDPA per
    segment (the boundaries are read on the host)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = torch.ops.aten._flash_attention_forward(
            q[0].transpose(0, 1),
            k[0].transpose(0, 1),
            v[0].transpose(0, 1),
            segments.cu,
            segments.cu,
            segments.longest,
            segments.longest,
            0.0,
            True,
            False,
            scale=scale,
        )[0]
        return out.transpose(0, 1).unsqueeze(0)
    bounds = segments.cu.tolist()
    parts = [
        F.scaled_dot_product_attention(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True, scale=scale, enable_gqa=kv_groups > 1
        )
        for a, b in zip(bounds, bounds[1:], strict=False)
        if b > a
    ]
    return torch.cat(parts, dim=2)


class PackedBatches:
    """A padding-free collator (TRL's) whose padding at the row's end is one segment: its position ids count up
    from 0, and the boundaries and longest length are taken again from the position ids. Other batches pass as they
    are. The pads' labels are -100 already, so nothing trains on them."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        if batch.get("cu_seq_lens_q") is None or batch.get("position_ids") is None:
            return batch
        positions = batch["position_ids"]
        real = sum(len(example["input_ids"]) for example in examples)
        total = positions.shape[1]
        if total > real:
            positions[0, real:] = torch.arange(total - real, dtype=positions.dtype)
        starts = (positions[0] == 0).nonzero().flatten()
        cu = torch.cat([starts, torch.tensor([total])]).to(torch.int32)
        lengths = cu.diff()
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = int(lengths.max())
        if "seq_idx" in batch:
            batch["seq_idx"] = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), lengths)[None]
        return batch

    def __getattr__(self, name: str) -> Any:  # the wrapped collator's settings (pad_token_id, ...)
        return getattr(self.__dict__["collate"], name)
