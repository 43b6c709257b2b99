"""Rotary position embedding as transformers applies it to Llama/Mistral queries and keys (rotate-half form)."""

from __future__ import annotations

import torch

from finechat.kernels import liger_ops, use_liger


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [batch, heads, seq, head_dim]; cos, sin: [batch or 1, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k): one Triton kernel for both on CUDA (Liger, rotates in place), else the reference."""
    if use_liger(q, k, cos, sin):
        return liger_ops().LigerRopeFunction.apply(q, k, cos, sin)  # type: ignore[union-attr]
    return apply_rope_reference(q, k, cos, sin)
