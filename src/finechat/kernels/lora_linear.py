"""A linear layer with a LoRA adapter over a frozen weight (bitsandbytes NF4 or plain), as one autograd function:

    y = x W^T + s * (drop(x) A^T) B^T (+ bias)

What it saves against peft's LoRA layer over bitsandbytes' 4-bit matmul: the adapter product is written first and
the base GEMM adds onto it in its epilogue (`addmm_` with beta=1) instead of three elementwise passes over y plus a
defensive clone; adapters
compute in the activation dtype (no float32 detour when the adapter weights are float32); dropout masks are
regenerated from a seed in backward instead of being kept as a copy of x per adapter, and applied inside the kernels
that read x for the adapter's products (finechat.kernels.dropout), so no dropped-out copy of x is ever written; only x
and the [tokens, rank] product x A^T are saved. The weight is dequantized again in backward, as bitsandbytes does,
so no dense copy lives between forward and backward. Several layers that read the same x (a decoder layer's q, k
and v) can go through one call together (lora_linears)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finechat.kernels import nf4
from finechat.kernels.dropout import Seed, lora_a, lora_a_grad, lora_dx

ENABLED = {"groups": True}  # switched off by `finechat bench train` to measure what lora_linears' groups buy


@dataclass
class AdapterProduct:
    """The adapters' product x A^T (dropout applied, without the scale) of one call: when given (xa), the call takes it
    instead of computing it; else the call leaves its own here. A checkpointed layer's first pass keeps it for the
    recompute, which then skips the pass over x (finechat.fastpath's kept attention)."""

    xa: torch.Tensor | None = None


@dataclass(frozen=True)
class _Mode:
    """_LoRALinear's settings: scale, dropout p, seed, output (False: y is not computed, see lora_linear), apart (one
    output per layer, see lora_linears), product (an AdapterProduct, or None)."""

    scale: float
    p: float
    seed: Any
    output: bool = True
    apart: bool = False
    product: AdapterProduct | None = None


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


_LOOK_UP = object()


def lora_linear(
    x: torch.Tensor,
    layer: nn.Module,
    seed: Seed = 0,
    found: Any = _LOOK_UP,
    output: bool = True,
    product: AdapterProduct | None = None,
) -> torch.Tensor:
    """layer(x) for a peft LoRA linear through the fused function; any other layer (or adapter setup) is called as
    is. seed (an int or a one-element int64 tensor, finechat.kernels.dropout) picks the dropout mask when the adapter
    has dropout and the layer is training; found is lora_adapter(layer) when the caller has it already.

    output=False is for a recompute whose result only carries gradients (the last projection of a checkpointed
    layer): the function then saves what its backward needs (x and the adapter's x A^T) but skips the weight's
    decoding and both products of y, and returns zeros broadcast to y's shape; its gradients are unchanged, since
    backward never reads y. product: the adapter's product x A^T, given or to be left there (AdapterProduct; a layer
    without a plain adapter leaves it empty)."""
    if found is _LOOK_UP:
        found = lora_adapter(layer)
    if found is None:
        return layer(x)
    return _group(x, [found], seed, layer.training, output, False, product)[0]


def lora_linears(
    x: torch.Tensor,
    layers: list[nn.Module],
    seeds: Sequence[Seed],
    found: list[Any] | None = None,
    output: bool = True,
    apart: bool = False,
    product: AdapterProduct | None = None,
) -> list[Any]:
    """[layer(x) for layer in layers] for linear layers that read the same x, e.g. a decoder layer's q, k and v. When
    they are all peft LoRA linears whose adapters share dropout and scale over frozen weights of one kind (all NF4 or
    all plain), through one call of the fused function (_LoRALinear): one adapter product over x for all of them, one
    buffer of the frozen weights decoded side by side and one GEMM, and in backward one product for x's gradient
    instead of one per layer and the adds between them. Their adapters then see one dropout mask (peft draws one per
    adapter; each adapter's dropout is still p, so only the masks' correlation between the layers differs).
    Otherwise each layer through lora_linear with its own seed of seeds (the group takes the first); found is
    [lora_adapter(layer) ...] when the caller has it already; output=False as for lora_linear (each result is then
    zeros broadcast to its shape). apart=True: the frozen weights are decoded and multiplied one by one, each into
    an output of its own (a decoder layer's gate and up, which SwiGLU reads as two dense tensors), while the
    adapters still share one product over x, one mask, and in backward one pass for A's gradients and x's.
    product: the group's adapter product, given or to be left there (AdapterProduct; without a group, None)."""
    found = [lora_adapter(layer) for layer in layers] if found is None else found
    if not (ENABLED["groups"] and _groupable(layers, found)):
        return [lora_linear(x, layer, seed, f, output) for layer, seed, f in zip(layers, seeds, found, strict=True)]
    return _group(x, found, seeds[0], layers[0].training, output, apart, product)


def _group(
    x: torch.Tensor,
    found: list[Any],
    seed: Seed,
    training: bool,
    output: bool,
    apart: bool,
    product: AdapterProduct | None,
) -> list[Any]:
    bases = tuple(f[0] for f in found)
    adapters = [f[1] for f in found]
    p = adapters[0].dropout if training else 0.0
    params = [t for a in adapters for t in (a.A, a.B)]
    mode = _Mode(adapters[0].scale, p, seed, output, apart, product)
    y = _LoRALinear.apply(x, bases, mode, *params)
    if apart:
        return list(y)
    return [y] if len(adapters) == 1 else list(y.split([a.B.shape[0] for a in adapters], dim=-1))


def _groupable(layers: list[nn.Module], found: list[Any]) -> bool:
    """True when these layers can run as one _LoRALinear (see lora_linears)."""
    if len(layers) < 2 or any(f is None for f in found):
        return False
    bases, adapters = [f[0] for f in found], [f[1] for f in found]
    states = [getattr(b.weight, "quant_state", None) for b in bases]
    nf4 = states[0] is not None
    return (
        len({(a.dropout, a.scale, a.A.dtype, a.B.dtype) for a in adapters}) == 1
        and len({layer.training for layer in layers}) == 1
        and len({b.weight.shape[-1] if s is None else s.shape[1] for b, s in zip(bases, states, strict=True)}) == 1
        and all((s is not None) == nf4 for s in states)
        and len({b.weight.dtype if s is None else s.dtype for b, s in zip(bases, states, strict=True)}) == 1
        and len({b.bias is None for b in bases}) == 1
    )


def _nf4(base: nn.Module) -> bool:
    return getattr(base.weight, "quant_state", None) is not None


def _width(base: nn.Module) -> int:
    """A linear layer's out-features (an NF4 weight is stored packed)."""
    weight: Any = base.weight
    return int(weight.quant_state.shape[0]) if _nf4(base) else int(weight.shape[0])


def dense_weights(bases: tuple[nn.Module, ...]) -> torch.Tensor:
    """The frozen weights of these linear layers (same in-features) stacked along the outputs, [sum out, in]; NF4
    weights are decoded straight into their rows."""
    weights: list[Any] = [b.weight for b in bases]
    if len(bases) == 1:
        return dense_weight(bases[0])
    if getattr(weights[0], "quant_state", None) is None:
        return torch.cat(weights)
    states = [w.quant_state for w in weights]
    rows = [int(qs.shape[0]) for qs in states]
    out = torch.empty(sum(rows), states[0].shape[1], dtype=states[0].dtype, device=weights[0].device)
    for weight, qs, part in zip(weights, states, out.split(rows), strict=True):
        nf4.dequantize(weight.data, qs, out=part)
    return out


def _joined(tensors: list[torch.Tensor], join: Any, dtype: torch.dtype) -> torch.Tensor:
    """join(tensors) in dtype; one tensor as it is (no copy for the common case of a single layer)."""
    return tensors[0].to(dtype) if len(tensors) == 1 else join(*[t.to(dtype) for t in tensors])


class _LoRALinear(torch.autograd.Function):
    """y = x W^T + s * (drop(x) A^T) B^T for one linear layer, or for several that read the same x: then W is their
    frozen weights stacked, A their adapters' A stacked and B their B's block-diagonal, so that y's columns are each
    layer's output side by side. Arguments: x, the base layers, the settings (_Mode), then A1, B1, A2, B2, ..."""

    @staticmethod
    def forward(ctx, x, bases, mode, *params):  # type: ignore[override]
        dtype = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        a = _joined(list(params[0::2]), lambda *t: torch.cat(t), dtype)  # [sum rank, in]
        p, seed, output, apart, product = mode.p, mode.seed, mode.output, mode.apart, mode.product
        # [tokens, rank], without the scale; dropout's keep-mask (without its 1/(1-p)) applied as x is read
        if product is not None and product.xa is not None:
            xa = product.xa
        else:
            xa = lora_a(x2, a, p, seed) if p > 0 else x2 @ a.t()
            if product is not None:
                product.xa = xa
        scale = mode.scale / (1.0 - p)  # inverted dropout's 1/(1-p), applied to the small product instead of to x
        ctx.bases, ctx.scale, ctx.p, ctx.seed, ctx.apart = bases, scale, p, seed, apart
        ctx.save_for_backward(x, xa, *params)
        if not output:  # a recompute whose result only carries gradients: what backward reads, no y
            zeros = x.new_zeros(())
            if apart:
                return tuple(zeros.expand(*x.shape[:-1], _width(b)) for b in bases)
            return zeros.expand(*x.shape[:-1], sum(_width(b) for b in bases))
        if apart:  # each layer's product from its columns of x A^T
            outs, col = [], 0
            for base, B in zip(bases, params[1::2], strict=True):
                y = _product(x2, xa[:, col : col + B.shape[1]], B.to(dtype), (base,), scale)
                outs.append(y.view(*x.shape[:-1], -1))
                col += B.shape[1]
            return tuple(outs)
        b = _joined(list(params[1::2]), torch.block_diag, dtype)  # [sum out, sum rank]
        return _product(x2, xa, b, bases, scale).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, *dys):  # type: ignore[override]
        x, xa, *params = ctx.saved_tensors
        scale, p, dtype = ctx.scale, ctx.p, x.dtype
        As, Bs = params[0::2], params[1::2]
        x2 = x.reshape(-1, x.shape[-1])
        parts = [dy.reshape(-1, dy.shape[-1]).to(dtype) for dy in dys]  # one per output
        if ctx.apart:
            dyb = torch.cat([d @ B.to(dtype) for d, B in zip(parts, Bs, strict=True)], dim=1)  # [tokens, sum rank]
        else:
            dyb = parts[0] @ _joined(Bs, torch.block_diag, dtype)
        grads: list[torch.Tensor | None] = [None] * len(params)
        if any(ctx.needs_input_grad[4::2]):  # B's: the diagonal blocks of dy^T (x A^T)
            full = None if ctx.apart else (parts[0].t() @ xa).mul_(scale)
            row = col = 0
            for i, B in enumerate(Bs):
                if full is None:
                    block = (parts[i].t() @ xa[:, col : col + B.shape[1]]).mul_(scale)
                else:
                    block = full[row : row + B.shape[0], col : col + B.shape[1]]
                grads[2 * i + 1] = block.to(B.dtype)
                row, col = row + B.shape[0], col + B.shape[1]
        if any(ctx.needs_input_grad[3::2]):  # A's: the forward's mask, regenerated from its seed
            dA = lora_a_grad(dyb, x2, p, ctx.seed, scale) if p > 0 else (dyb.t() @ x2).mul_(scale)
            row = 0
            for i, A in enumerate(As):
                grads[2 * i] = dA[row : row + A.shape[0]].to(A.dtype)
                row += A.shape[0]
        dx = None
        if ctx.needs_input_grad[0]:
            # as in forward: the adapter's term first (masked as it is written), the base GEMM adds onto it
            a = _joined(As, lambda *t: torch.cat(t), dtype)
            if p > 0:
                dx = lora_dx(dyb, a, p, ctx.seed, scale)
            else:
                dx = torch.empty_like(x2)
                dx.addmm_(dyb, a, beta=0, alpha=scale)
            for bases, dy2 in zip([[b] for b in ctx.bases] if ctx.apart else [ctx.bases], parts, strict=True):
                w = dense_weights(tuple(bases)).to(dtype)
                dx.addmm_(dy2, w)
                del w
            dx = dx.view(x.shape)
        return dx, None, None, *grads


def _product(
    x2: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, bases: tuple[nn.Module, ...], scale: float
) -> torch.Tensor:
    """y = x W^T + s (x A^T) B^T (+ bias), W the frozen weights of bases stacked, b their adapters' B (block-diagonal
    for several). The adapter's term is written first and the base GEMM adds onto it (beta=1): the add then happens in
    the epilogue of a compute-bound GEMM instead of in a memory-bound pass over y of its own (the adapter addmm_ after
    the base GEMM took 35 ms of the profiled 8x1024 step)."""
    dtype = x2.dtype
    y = torch.empty(x2.shape[0], b.shape[0], device=x2.device, dtype=dtype)
    y.addmm_(xa, b.t(), beta=0, alpha=scale)
    w = dense_weights(bases).to(dtype)
    y.addmm_(x2, w.t())
    del w
    biases: list[Any] = [base.bias for base in bases]
    if biases[0] is not None:
        y += _joined(biases, lambda *t: torch.cat(t), dtype)
    return y


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
