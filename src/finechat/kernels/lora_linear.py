"""A linear layer with a LoRA adapter over a frozen weight (bitsandbytes NF4 or plain), as one autograd function:

    y = x W^T + s * (drop(x) A^T) B^T (+ bias)

What it saves against peft's LoRA layer over bitsandbytes' 4-bit matmul: the adapter product is written first and
the base GEMM adds onto it in its epilogue (`addmm_` with beta=1) instead of three elementwise passes over y plus a
defensive clone; adapters
compute in the activation dtype (no float32 detour when the adapter weights are float32); dropout masks are
regenerated from a seed in backward instead of being kept as a copy of x per adapter, and applied inside the kernels
that read x for the adapter's products (finechat.kernels.dropout), so no dropped-out copy of x is ever written; only x
and the [tokens, rank] product x A^T are saved. The weight is dequantized again in backward, as bitsandbytes does,
so no dense copy lives between forward and backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finechat.kernels import nf4
from finechat.kernels.dropout import lora_a, lora_a_grad, lora_dx


@dataclass(frozen=True)
class Adapter:
    """One active LoRA adapter of a layer: A [rank, in], B [out, rank], scale (alpha/rank) and dropout probability."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout: float


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The frozen [out, in] weight of a linear layer, dequantized for a bitsandbytes 4-bit layer."""
    weight: Any = base.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight
    return nf4.dequantize(weight.data, quant_state)


def lora_adapter(layer: Any) -> tuple[nn.Module, Adapter] | None:
    """(base layer, adapter) when layer is a peft LoRA linear with exactly one plain adapter active, else None."""
    if not (hasattr(layer, "base_layer") and hasattr(layer, "lora_A")):
        return None
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):  # DoRA and other variants: peft's path
        return None
    name = active[0]
    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    if not (isinstance(lora_a, nn.Linear) and lora_a.bias is None and lora_b.bias is None):
        return None
    dropout = layer.lora_dropout[name]
    p = float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0
    return layer.get_base_layer(), Adapter(lora_a.weight, lora_b.weight, float(layer.scaling[name]), p)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, A, B, base, scale, p, seed):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        # [tokens, rank], without the scale; dropout's keep-mask (without its 1/(1-p)) applied as x is read
        xa = lora_a(x2, A.to(x.dtype), p, seed) if p > 0 else x2 @ A.to(x.dtype).t()
        scale = scale / (1.0 - p)  # inverted dropout's 1/(1-p), applied to the small product instead of to x
        # The adapter's term is written first and the base GEMM adds onto it (beta=1): the add then happens in the
        # epilogue of a compute-bound GEMM instead of in a memory-bound pass over y of its own (the adapter addmm_
        # after the base GEMM took 35 ms of the profiled 8x1024 step).
        y = torch.empty(x2.shape[0], B.shape[0], device=x.device, dtype=x.dtype)
        y.addmm_(xa, B.to(x.dtype).t(), beta=0, alpha=scale)
        w = dense_weight(base).to(x.dtype)
        y.addmm_(x2, w.t())
        del w
        if base.bias is not None:
            y += base.bias.to(x.dtype)
        ctx.save_for_backward(x, A, B, xa)
        ctx.base, ctx.scale, ctx.p, ctx.seed = base, scale, p, seed
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, A, B, xa = ctx.saved_tensors
        scale, p = ctx.scale, ctx.p
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dtype)
        a, b = A.to(dtype), B.to(dtype)
        dyb = dy2 @ b  # [tokens, rank]
        dx = dA = dB = None
        if ctx.needs_input_grad[2]:
            dB = (dy2.t() @ xa).mul_(scale).to(B.dtype)
        if ctx.needs_input_grad[1]:
            if p > 0:  # the forward's mask, regenerated from its seed
                dA = lora_a_grad(dyb, x2, p, ctx.seed, scale).to(A.dtype)
            else:
                dA = (dyb.t() @ x2).mul_(scale).to(A.dtype)
        if ctx.needs_input_grad[0]:
            # as in forward: the adapter's term first (masked as it is written), the base GEMM adds onto it
            if p > 0:
                dx = lora_dx(dyb, a, p, ctx.seed, scale)
            else:
                dx = torch.empty_like(x2)
                dx.addmm_(dyb, a, beta=0, alpha=scale)
            w = dense_weight(ctx.base).to(dtype)
            dx.addmm_(dy2, w)
            del w
            dx = dx.view(x.shape)
        return dx, dA, dB, None, None, None, None


_LOOK_UP = object()


def lora_linear(x: torch.Tensor, layer: nn.Module, seed: int = 0, found: Any = _LOOK_UP) -> torch.Tensor:
    """layer(x) for a peft LoRA linear through the fused function; any other layer (or adapter setup) is called as
    is. seed picks the dropout mask when the adapter has dropout and the layer is training; found is
    lora_adapter(layer) when the caller has it already."""
    if found is _LOOK_UP:
        found = lora_adapter(layer)
    if found is None:
        return layer(x)
    base, adapter = found
    p = adapter.dropout if layer.training else 0.0
    return _LoRALinear.apply(x, adapter.A, adapter.B, base, adapter.scale, p, seed)


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same function in plain PyTorch ops (autograd differentiates it); mask is the inverted-dropout mask."""
    xd = x * mask if mask is not None else x
    y = x @ weight.t() + scale * ((xd @ A.t()) @ B.t())
    return y + bias if bias is not None else y
