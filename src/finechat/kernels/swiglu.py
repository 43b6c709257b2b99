"""SwiGLU gate of the Llama/Mistral MLP: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finechat.kernels import liger_ops, use_liger


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up in the inputs' dtype, as transformers' MLP computes it."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: one Triton kernel each way on CUDA (Liger; backward recomputes silu), else the reference."""
    if use_liger(gate, up):
        # Liger's kernel addresses gate, up and its output with one row stride: give it dense rows
        gate, up = gate.contiguous(), up.contiguous()
        return liger_ops().LigerSiLUMulFunction.apply(gate, up)  # type: ignore[union-attr]
    return swiglu_reference(gate, up)
