"""Fused operations for the decode step: each does in one kernel what transformers' Llama/Mistral modules do in
several, with the same roundings, so that the step's logits stay bit-for-bit those of the unfused modules.

At batch 1 a decode step of a 7B model is bound by how many kernels it launches (about 42 per layer with
transformers' modules: RMSNorm alone is 8, the rotary embedding about 10), not by the weight bytes it reads. These
kernels cut that to about 15 per layer:

- `add_square(a, b)`: the residual add and the squares that RMSNorm averages (float32);
- the mean of those squares stays a torch reduction, so its summation order is exactly the unfused norm's
  (batched steps, not bitwise one-row steps anyway, take all three in one kernel: `rms_norm(..., exact=False)`);
- `rms_apply(s, variance, weight, eps)`: x * rsqrt(variance + eps), rounded to the input dtype, times the weight;
- `rope_into_cache(...)`: the rotary embedding of q and k, with k and v written straight into the static KV cache;
- `silu_mul(gate, up)`: SiLU(gate) rounded, times up.

Every intermediate is rounded where PyTorch rounds it (a bf16 tensor between two ops), exp and rsqrt are the CUDA
math library's, division is IEEE round-to-nearest, and a product followed by a sum is never fused into one
multiply-add, as in PyTorch's kernels (benchmarks/probes/decode_rounding.py checks each choice on a GPU). `finechat.decode` checks the fused
step against the unfused one before using it. Under TRITON_INTERPRET=1 (CPU tests) exp and rsqrt are numpy's, so the
kernels agree with the references only closely there, not bitwise."""

from __future__ import annotations

import functools
import importlib
import os
from typing import Any

import torch


def available(device: torch.device) -> bool:
    """True when the kernels can run on tensors of this device (CUDA with Triton, or Triton's CPU interpreter)."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpreting) and _kernels() is not None


# ---------------------------------------------------------------------------------------------------------------------
# References: transformers' arithmetic, op by op (what the kernels must reproduce)


def add_square_reference(a: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    s = a if b is None else a + b
    return s, s.float().pow(2)


def rms_apply_reference(s: torch.Tensor, variance: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = s.float() * torch.rsqrt(variance + eps)
    return weight * h.to(s.dtype)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [rows, heads, dim], cos/sin [rows, dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos[:, None]) + (rotated * sin[:, None])


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


# ---------------------------------------------------------------------------------------------------------------------
# The fused versions


def add_square(a: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a + b, (a + b)² in float32) over rows of the last dimension; b may be None (then a itself)."""
    width = a.shape[-1]
    rows = a.numel() // width
    s = a if b is None else torch.empty_like(a)
    sq = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    _kernels().add_square[(rows,)](a, a if b is None else b, s, sq, width, HAS_B=b is not None, BLOCK=_block(width))
    return s, sq


def rms_norm(
    module: Any, a: torch.Tensor, b: torch.Tensor | None, exact: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, module(s)) with s = a + b: the residual add and a Llama/Mistral RMSNorm module. exact: in three kernels,
    the mean of the squares by torch's reduction, bit for bit the module; else in one kernel whose mean sums in its
    own order (equal to rounding: for batched steps, whose rows are not bitwise one-row steps anyway; a torch mean
    over 16 rows took 9 µs on an H200, 583 of a 16-row Mistral-7B step's 8,138)."""
    if exact:
        s, sq = add_square(a, b)
        variance = sq.mean(-1, keepdim=True)  # torch's reduction: the same summation order as the module's own
        return s, rms_apply(s, variance, module.weight, module.variance_epsilon)
    width = a.shape[-1]
    rows = a.numel() // width
    s = a if b is None else torch.empty_like(a)
    weight = module.weight
    out = torch.empty(a.shape, dtype=torch.promote_types(a.dtype, weight.dtype), device=a.device)
    _kernels().add_rms_norm[(rows,)](
        a, a if b is None else b, s, weight, out, width, module.variance_epsilon, HAS_B=b is not None,
        PRECISE=_precise(), BLOCK=_block(width),
    )  # fmt: skip
    return s, out


def rms_apply(s: torch.Tensor, variance: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    width = s.shape[-1]
    rows = s.numel() // width
    out = torch.empty(s.shape, dtype=torch.promote_types(s.dtype, weight.dtype), device=s.device)
    _kernels().rms_apply[(rows,)](s, variance, weight, out, width, eps, PRECISE=_precise(), BLOCK=_block(width))
    return out


def rope_into_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """Rotate q and k ([rows, heads*dim] each, one token per row, the last dimension contiguous: k and v may be
    column slices of one product) by cos/sin ([rows, dim]); write k and v into keys/values ([slots, kv_heads,
    capacity, dim]) of slot `row` at positions[row]; returns q as [rows, heads, 1, dim]."""
    rows, dim = cos.shape[0], keys.shape[-1]
    heads, kv_heads = q.shape[-1] // dim, keys.shape[1]
    q, k, v = (t.reshape(rows, t.shape[-1]) for t in (q, k, v))  # views: one token per row
    if not all(t.stride(-1) == 1 for t in (q, k, v)):
        raise ValueError("rope_into_cache: q, k and v need a contiguous last dimension")
    q_out = torch.empty(rows, heads, 1, dim, dtype=q.dtype, device=q.device)
    _kernels().rope_into_cache[(rows, heads + kv_heads)](
        q, k, v, q.stride(0), k.stride(0), v.stride(0), cos.reshape(rows, dim), sin.reshape(rows, dim), positions,
        q_out, keys, values, heads, kv_heads, keys.shape[2], DIM=dim, PRECISE=_precise(),
    )  # fmt: skip
    return q_out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 1024
    _kernels().silu_mul[((n + block - 1) // block,)](gate, up, out, n, PRECISE=_precise(), BLOCK=block)
    return out


def _block(width: int) -> int:
    return 1 << max(width - 1, 1).bit_length()


def _precise() -> bool:
    """Use the CUDA math library's exp/rsqrt (compiled kernels); the interpreter only knows numpy's."""
    return os.environ.get("TRITON_INTERPRET") != "1"


@functools.cache
def _kernels() -> Any:
    """finechat.kernels.decode_triton, built for the compiler, or for Triton's interpreter under TRITON_INTERPRET=1
    (tests switch between the two and clear this cache); None without Triton."""
    try:
        from finechat.kernels import decode_triton
    except ImportError:
        return None
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if interpreting != decode_triton.INTERPRETED:
        decode_triton = importlib.reload(decode_triton)
    return decode_triton
