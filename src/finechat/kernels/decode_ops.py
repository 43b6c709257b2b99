"""Fused operations for the decode step: each does in one kernel what transformers' Llama/Mistral modules do in
several, with the same roundings, so that the step's logits stay bit-for-bit those of the unfused modules.

At batch 1 a decode step of a 7B model is bound by how many kernels it launches (about 42 per layer with
transformers' modules: RMSNorm alone is 8, the rotary embedding about 10), not by the weight bytes it reads. These
kernels cut that to about 15 per layer:

- `add_square(a, b)`: the residual add and the squares that RMSNorm averages (float32);
- the mean of those squares stays a torch reduction, so its summation order is exactly the unfused norm's;
- `rms_norm_row(module, a, b)`: all of RMSNorm for one row (the batch-1 step) in one kernel, the mean summed in the
  order PyTorch's CUDA reduction sums one row (`torch_mean_order`), used only where a step through it gives the
  modules' logits bit for bit;
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


def rms_norm(module: Any, a: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, module(s)) with s = a + b: the residual add and a Llama/Mistral RMSNorm module in three kernels."""
    s, sq = add_square(a, b)
    variance = sq.mean(-1, keepdim=True)  # torch's reduction: the same summation order as the module's own
    return s, rms_apply(s, variance, module.weight, module.variance_epsilon)


# ---------------------------------------------------------------------------------------------------------------------
# RMSNorm of one row in one kernel: the mean of the squares summed in the order of PyTorch's own CUDA reduction


def torch_mean_order(width: int) -> tuple[int, int] | None:
    """(threads, vectors per thread) of the kernel PyTorch's CUDA `mean` over the last dimension of ONE contiguous
    float32 row of `width` elements launches (ATen's Reduce.cuh: `setReduceConfig`, vectorized input), or None where
    this module does not reproduce it (width <= 128, not a multiple of 4, or more than 4 vectors per thread: over
    8,192 wide).

    That kernel sums as follows. The row is read as 4-element vectors; thread t of `threads` (a power of two, at most
    512) takes vectors t, t + threads, ... and adds component i of each to its accumulator i, in order, from 0. The
    four accumulators are added left to right. The threads' sums are then halved pairwise through shared memory
    (thread t adds thread t + offset, offset = threads/2 down to 32), and the last 32 by a warp's shuffle-down (lane
    t adds lane t + offset, offset = 1, 2, 4, 8, 16). The mean is that sum times float32(1 / width)."""
    if width <= 128 or width % 4:
        return None
    vectors = width // 4
    threads = 512 if vectors >= 512 else 1 << (vectors.bit_length() - 1)
    per_thread = -(-vectors // threads)
    return (threads, per_thread) if per_thread <= 4 else None


def mean_factor(width: int) -> float:
    """float32(1) / float32(width), rounded once as PyTorch's mean computes its factor."""
    import numpy as np

    return float(np.float32(1) / np.float32(width))


WARP_ORDERS = ("ascending", "descending")  # the shuffle-down offsets of the last 32 sums: 1 to 16 (as read), or 16 to 1


def torch_mean_emulated(squares: torch.Tensor, warp: str = "ascending") -> torch.Tensor:
    """The mean of one float32 row as PyTorch's CUDA kernel sums it (torch_mean_order), in PyTorch ops: the
    reference the fused kernel is tested against (the CPU's own mean sums in another order). `warp` picks the
    order of the warp's last five steps (WARP_ORDERS)."""
    width = squares.shape[-1]
    order = torch_mean_order(width)
    if order is None:
        raise ValueError(f"torch_mean_emulated: width {width} is not covered")
    threads, per_thread = order
    padded = torch.zeros(per_thread * threads * 4, dtype=torch.float32, device=squares.device)
    padded[:width] = squares.reshape(width).float()
    vectors = padded.view(per_thread, threads, 4)
    acc = vectors[0].clone()
    for j in range(1, per_thread):
        acc = acc + vectors[j]
    value = ((acc[:, 0] + acc[:, 1]) + acc[:, 2]) + acc[:, 3]
    while value.numel() > 32:
        half = value.numel() // 2
        value = value[:half] + value[half:]
    for _ in range(5):  # the warp's shuffle-down: what lane 0 ends with
        if warp == "descending":
            value = value[: value.numel() // 2] + value[value.numel() // 2 :]
        else:
            value = value[0::2] + value[1::2]
    return value * torch.tensor(mean_factor(width), dtype=torch.float32, device=squares.device)


def rms_norm_row(
    module: Any, a: torch.Tensor, b: torch.Tensor | None, warp: str = "ascending"
) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm in one kernel (add, squares, their mean in PyTorch's CUDA order for one row, the norm) instead of
    three; the caller checks torch_mean_order(width) first. Several rows are each summed as a lone row is (PyTorch
    would sum a batch in another order: batched steps are not bitwise batch-1 steps anyway)."""
    width = a.shape[-1]
    rows = a.numel() // width
    threads, per_thread = torch_mean_order(width)  # type: ignore[misc]
    s = a if b is None else torch.empty_like(a)
    weight = module.weight
    out = torch.empty(a.shape, dtype=torch.promote_types(a.dtype, weight.dtype), device=a.device)
    _kernels().rms_norm_row[(rows,)](
        a, a if b is None else b, s, weight, out, width, module.variance_epsilon, mean_factor(width),
        HAS_B=b is not None, PRECISE=_precise(), KB=threads // 32, LOG_KB=(threads // 32).bit_length() - 1,
        NV=per_thread, WARP_DESCENDING=warp == "descending",
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
