"""RMSNorm as Llama and Mistral define it: statistics in float32, output rounded to the input dtype, then scaled."""

from __future__ import annotations

import torch

from finechat.kernels import liger_ops, use_liger


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)), the transformers LlamaRMSNorm/MistralRMSNorm arithmetic."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x: one fused Triton kernel on CUDA (Liger, casting mode 'llama'), else the reference."""
    if use_liger(x, weight):
        # in_place=False: the incoming gradient may be shared, so it is not overwritten with the input gradient.
        return liger_ops().LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)  # type: ignore[union-attr]
    return rms_norm_reference(x, weight, eps)
