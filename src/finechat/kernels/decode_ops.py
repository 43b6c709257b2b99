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
    try:
        import triton
        import triton.language as tl
        from triton.language.extra import libdevice
    except ImportError:
        return None

    @triton.jit
    def add_square_kernel(a_ptr, b_ptr, s_ptr, sq_ptr, width, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        inside = offs < width
        a = tl.load(a_ptr + row * width + offs, mask=inside, other=0.0)
        if HAS_B:
            b = tl.load(b_ptr + row * width + offs, mask=inside, other=0.0)
            a = (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)
            tl.store(s_ptr + row * width + offs, a, mask=inside)
        f = a.to(tl.float32)
        tl.store(sq_ptr + row * width + offs, f * f, mask=inside)

    @triton.jit
    def rms_apply_kernel(s_ptr, var_ptr, w_ptr, out_ptr, width, eps, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        inside = offs < width
        s = tl.load(s_ptr + row * width + offs, mask=inside, other=0.0)
        v = tl.load(var_ptr + row).to(tl.float32) + eps
        r = libdevice.rsqrt(v) if PRECISE else tl.math.rsqrt(v)
        h = (s.to(tl.float32) * r).to(s.dtype)
        w = tl.load(w_ptr + offs, mask=inside, other=0.0)
        out = w.to(tl.float32) * h.to(tl.float32)
        tl.store(out_ptr + row * width + offs, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def rope_into_cache_kernel(
        q_ptr, k_ptr, v_ptr, q_row, k_row, v_row, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, keys_ptr, values_ptr,
        heads, kv_heads, capacity, DIM: tl.constexpr, PRECISE: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        d = tl.arange(0, DIM)
        half: tl.constexpr = DIM // 2
        partner = tl.where(d < half, d + half, d - half)
        c = tl.load(cos_ptr + row * DIM + d).to(tl.float32)
        s = tl.load(sin_ptr + row * DIM + d).to(tl.float32)
        if head < heads:  # noqa: SIM108 (a branch on a runtime value: no conditional expression in Triton)
            src = q_ptr + row * q_row + head * DIM
        else:
            src = k_ptr + row * k_row + (head - heads) * DIM
        x = tl.load(src + d)
        other = tl.load(src + partner).to(tl.float32)
        rotated = tl.where(d < half, -other, other)
        # (x * cos) + (rotate_half(x) * sin), each product rounded to x's dtype as PyTorch rounds it. Plain * and +
        # let the compiler fuse them into one multiply-add (measured on an H200: a quarter of the outputs then differ
        # from PyTorch's).
        if PRECISE:
            a = libdevice.mul_rn(x.to(tl.float32), c).to(x.dtype).to(tl.float32)
            b = libdevice.mul_rn(rotated, s).to(x.dtype).to(tl.float32)
            out = libdevice.add_rn(a, b).to(x.dtype)
        else:
            a = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)
            out = (a + (rotated * s).to(x.dtype).to(tl.float32)).to(x.dtype)
        if head < heads:
            tl.store(q_out_ptr + (row * heads + head) * DIM + d, out)
        else:
            kv = head - heads
            at = ((row * kv_heads + kv) * capacity + tl.load(pos_ptr + row)) * DIM
            tl.store(keys_ptr + at + d, out)
            tl.store(values_ptr + at + d, tl.load(v_ptr + row * v_row + kv * DIM + d))

    @triton.jit
    def silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(g_ptr + offs, mask=inside, other=0.0)
        u = tl.load(u_ptr + offs, mask=inside, other=0.0)
        x = g.to(tl.float32)
        e = libdevice.exp(-x) if PRECISE else tl.exp(-x)
        act = tl.math.div_rn(x, 1.0 + e).to(g.dtype)
        tl.store(out_ptr + offs, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=inside)

    @triton.jit
    def rms_norm_row_kernel(
        a_ptr, b_ptr, s_ptr, w_ptr, out_ptr, width, eps, factor,
        HAS_B: tl.constexpr, PRECISE: tl.constexpr, KB: tl.constexpr, LOG_KB: tl.constexpr, NV: tl.constexpr,
        WARP_DESCENDING: tl.constexpr,
    ):  # fmt: skip
        # PyTorch's thread t = 32k + l (KB * 32 threads) reads the 4-element vectors j * KB * 32 + t, j < NV; here a
        # [4, KB, 32] tile per j holds component i of thread (k, l)'s vector j
        row = tl.program_id(0).to(tl.int64) * width  # one program per row, each summed as a lone row is
        i = tl.arange(0, 4)[:, None, None]
        thread = (tl.arange(0, KB)[:, None] * 32 + tl.arange(0, 32)[None, :])[None, :, :]
        acc = tl.full([4, KB, 32], 0.0, tl.float32)
        for j in tl.static_range(NV):
            offs = (j * KB * 32 + thread) * 4 + i
            inside = offs < width
            a = tl.load(a_ptr + row + offs, mask=inside, other=0.0)
            if HAS_B:
                b = tl.load(b_ptr + row + offs, mask=inside, other=0.0)
                a = (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)
                tl.store(s_ptr + row + offs, a, mask=inside)
            f = a.to(tl.float32)
            # each square rounded on its own (no multiply-add into the sum); zeros past the row add nothing
            acc = acc + (libdevice.mul_rn(f, f) if PRECISE else f * f)
        # a thread's four accumulators, left to right (a masked sum adds zeros: exact)
        c0 = tl.sum(tl.where(i == 0, acc, 0.0), axis=0)
        c1 = tl.sum(tl.where(i == 1, acc, 0.0), axis=0)
        c2 = tl.sum(tl.where(i == 2, acc, 0.0), axis=0)
        c3 = tl.sum(tl.where(i == 3, acc, 0.0), axis=0)
        value = ((c0 + c1) + c2) + c3  # [KB, 32]
        for level in tl.static_range(LOG_KB, 0, -1):  # shared memory: thread t adds thread t + 32 * 2**(level-1)
            value = tl.sum(tl.reshape(value, [2, 1 << (level - 1), 32]), axis=0)
        value = tl.reshape(value, [32])
        for level in tl.static_range(5, 0, -1):  # a warp's shuffle-down, lane l adding lane l + offset
            if WARP_DESCENDING:  # offsets 16, 8, 4, 2, 1
                value = tl.sum(tl.reshape(value, [2, 1 << (level - 1)]), axis=0)
            else:  # offsets 1, 2, 4, 8, 16 (Reduce.cuh's block_x_reduce as read)
                value = tl.sum(tl.reshape(value, [1 << (level - 1), 2]), axis=1)
        variance = libdevice.mul_rn(value, factor) if PRECISE else value * factor  # [1]
        v = variance + eps
        r = tl.reshape(libdevice.rsqrt(v) if PRECISE else tl.math.rsqrt(v), [1, 1, 1])
        # second pass: a + b again rather than s read back, which another thread may have written (no barrier here)
        for j in tl.static_range(NV):
            offs = (j * KB * 32 + thread) * 4 + i
            inside = offs < width
            a = tl.load(a_ptr + row + offs, mask=inside, other=0.0)
            if HAS_B:
                b = tl.load(b_ptr + row + offs, mask=inside, other=0.0)
                a = (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)
            h = (a.to(tl.float32) * r).to(a.dtype)
            w = tl.load(w_ptr + offs, mask=inside, other=0.0)
            out = w.to(tl.float32) * h.to(tl.float32)
            tl.store(out_ptr + row + offs, out.to(out_ptr.dtype.element_ty), mask=inside)

    class Kernels:
        rms_norm_row = rms_norm_row_kernel
        add_square = add_square_kernel
        rms_apply = rms_apply_kernel
        rope_into_cache = rope_into_cache_kernel
        silu_mul = silu_mul_kernel

    return Kernels
