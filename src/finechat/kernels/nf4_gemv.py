"""One row of x (a batch-1 decode step) times a double-quantized NF4 weight, bit for bit what bitsandbytes 0.50.2
returns on an H100/H200, from one Triton kernel.

Why bit for bit: greedy decoding must give the tokens plain `generate` gives, and one different bf16 output in one
layer is enough to flip a later argmax. So the kernel does not merely compute x @ W^T well; it does bitsandbytes'
arithmetic (the one-row kernel `gemm_4bit_simt`, read from its source and its sm_90 machine code), rounding where it
rounds and adding in its order. For a row n of W ([N, K], K a multiple of 1024, bf16 or fp16 x):

- a warp of 32 lanes walks K in groups of 1024 weights: in group g, lane l owns weights k0 = 1024g + 32l .. k0 + 31,
  which sit in one 64-weight block b = n*K/64 + k0/64 and in the 16 bytes of W from (n*K + k0) / 2;
- the block's scale is one fused multiply-add in float32, code2[absmax8[b]] * absmax2[b // 256] + offset (a single
  rounding: since 0.50 the kernel decodes the 8-bit scales itself, where `dequantize_4bit`, and so
  finechat.kernels.nf4, rounds the product and the sum separately), then rounded to x's dtype; the 16 NF4 code
  values are rounded to x's dtype too;
- byte p of the lane (p = 0..15) holds weights k0 + 2p (high nibble) and k0 + 2p + 1 (low nibble): each weight is
  code * scale rounded to x's dtype, each product with x rounded to x's dtype, then the two products are added in
  float32 and that pair sum is added to the lane's float32 accumulator, pairs in order, groups in order;
- the 32 accumulators are summed as a warp's shuffle-down reduction sums them (offsets 16, 8, 4, 2, 1: lane i adds
  lane i + offset), and lane 0's total + 0.0 is rounded to x's dtype.

`nf4_gemv_emulated` does exactly that with PyTorch ops (the reference the kernel is tested against: bitsandbytes'
CUDA kernel cannot run on CPU); `nf4_gemv` runs the Triton kernel, BN output rows per program. Other K, blocksizes,
or a bias: `applies` is False and the caller keeps bitsandbytes. benchmarks/probes/nf4_gemv.py compares both with
bitsandbytes on a GPU."""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from finechat.kernels import checked, nf4_matmul, nf4_prmt

# How the kernel finds each byte's two code values: "table", one load per byte from a 256-entry table of pairs
# (code_pairs), products in float32 rounded to dtype; "prmt", byte permutes in registers and products on pairs of
# dtype (finechat.kernels.nf4_prmt: PTX, so CUDA only). Both give bitsandbytes' bits; the decoder keeps the faster.
LOOKUPS = ("prmt", "table")
GROUP = 1024  # weights of one row a warp covers per step: 32 lanes x 32 weights
_BN = 4  # output rows per program
_WARPS = 4  # a [4, 32, 16] byte tile is one 16-byte load per thread of 4 warps


def applies(module: Any) -> bool:
    """True for a bias-free Linear4bit of double-quantized NF4 (blocks of 64, second-level blocks of 256) whose input
    size is a multiple of 1024: the weights whose one-row product bitsandbytes computes as described above."""
    if not nf4_matmul.applies(module):
        return False
    qs = module.weight.quant_state
    return qs.state2.blocksize == 256 and qs.shape[1] % GROUP == 0


def nf4_gemv_emulated(x: torch.Tensor, module: Any, rows_per_chunk: int = 1024) -> torch.Tensor:
    """x [..., K] (one row) @ W^T -> [..., N] with bitsandbytes' roundings and summation order, in PyTorch ops."""
    dtype = _check_input(x, module)
    qs = module.weight.quant_state
    N, K = qs.shape
    xf = x.reshape(K)
    x_even, x_odd = xf[0::2].float(), xf[1::2].float()  # weight 2p is byte p's high nibble
    nf4 = qs.code.to(dtype).float()
    packed = module.weight.reshape(N, K // 2)
    scale = _scales(qs).to(dtype).float().reshape(N, K // 64)
    out = torch.empty(N, dtype=dtype, device=x.device)
    for start in range(0, N, rows_per_chunk):  # [rows, K] float32 intermediates: a chunk at a time
        rows = slice(start, min(start + rows_per_chunk, N))
        byte = packed[rows].int()
        block_scale = scale[rows].repeat_interleave(32, dim=1)  # one scale per 64 weights = 32 bytes
        w_even = (nf4[byte >> 4] * block_scale).to(dtype).float()
        w_odd = (nf4[byte & 15] * block_scale).to(dtype).float()
        pair = (x_even * w_even).to(dtype).float() + (x_odd * w_odd).to(dtype).float()
        pair = pair.reshape(-1, K // GROUP, 32, 16)  # [rows, group, lane, byte of the lane]
        acc = torch.zeros(pair.shape[0], 32, dtype=torch.float32, device=x.device)
        for g in range(K // GROUP):
            for p in range(16):
                acc = acc + pair[:, g, :, p]
        for step in (16, 8, 4, 2, 1):  # shuffle-down: lane i adds lane i + step
            acc = acc[:, :step] + acc[:, step : 2 * step]
        out[rows] = (acc[:, 0] + 0.0).to(dtype)
    return out.reshape(*x.shape[:-1], N)


def _scales(qs: Any) -> torch.Tensor:
    """The float32 block scales fma(code2[absmax8], absmax2, offset), one rounding, as bitsandbytes' kernel has them.

    code2 * absmax2 is exact in float64 (24 + 24 significant bits), but adding offset there rounds again, and two
    roundings (to float64, then float32) can differ from fma's one when the first lands on a float32 tie. Rounding
    that add to odd instead (keep the float64 sum where it is exact or odd, else take its odd neighbour towards the
    exact sum) makes the second rounding the correct one: 53 bits leave more than the 2 spare bits this needs."""
    block = torch.arange(qs.absmax.numel(), device=qs.absmax.device)
    product = qs.state2.code[qs.absmax.long()].double() * qs.state2.absmax[block // qs.state2.blocksize].double()
    offset = qs.offset.double()
    total = product + offset
    back = total - product
    error = (product - (total - back)) + (offset - back)  # exact: total + error == product + offset (TwoSum)
    even = (total.view(torch.int64) & 1) == 0
    towards = torch.where(error > 0, torch.inf, -torch.inf).to(torch.float64)
    total = torch.where((error != 0) & even, torch.nextafter(total, towards), total)
    return total.float()


def nf4_gemv(
    x: torch.Tensor, module: Any, bn: int = _BN, num_warps: int = _WARPS, lookup: str = "table"
) -> torch.Tensor:
    """x [..., K] (one row) @ W^T -> [..., N], bitwise bitsandbytes' one-row result, through the Triton kernel.
    lookup: one of LOOKUPS, how the kernel finds the code values and multiplies (the decoder times both at load)."""
    if lookup not in LOOKUPS:
        raise ValueError(f"nf4_gemv: lookup {lookup!r}; expected one of {', '.join(LOOKUPS)}")
    kernels = _kernel()
    if kernels is None:
        raise RuntimeError("the NF4 one-row kernel is not available (no Triton)")
    dtype = _check_input(x, module)
    weight = module.weight
    qs = weight.quant_state
    N, K = qs.shape
    out = torch.empty(N, dtype=dtype, device=x.device)
    shape, x = x.shape, x.reshape(K).contiguous()
    scales = (qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset)
    fused_fma = os.environ.get("TRITON_INTERPRET") != "1"
    if lookup == "prmt":
        planes = nf4_prmt.planes(qs.code, dtype)
        kernels.nf4_gemv_prmt_kernel[(-(-N // bn),)](
            x, weight, *scales, planes, out, N, K, BLOCKSIZE2=qs.state2.blocksize, BN=bn, FUSED_FMA=fused_fma,
            ROW_ASM=nf4_prmt.row_ptx(dtype), num_warps=num_warps,
        )  # fmt: skip
    else:
        kernels.nf4_gemv_kernel[(-(-N // bn),)](
            x, weight, *scales, code_pairs(qs.code, dtype), out, N, K,
            BLOCKSIZE2=qs.state2.blocksize, BN=bn, FUSED_FMA=fused_fma, num_warps=num_warps,
        )  # fmt: skip
    return out.reshape(*shape[:-1], N)


_PAIRS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def code_pairs(code: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[256] int32: for each byte value b, the NF4 code value of its high nibble (bits 0-15) and of its low nibble
    (bits 16-31), each rounded to dtype, so the kernel looks both up at once. One table per device and dtype: NF4's
    16 code values are the same in every weight (the decoder's check at load compares the results with
    bitsandbytes' on the real weights)."""
    key = (code.device, dtype)
    if key not in _PAIRS:
        bits = code.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
        byte = torch.arange(256, device=code.device)
        _PAIRS[key] = bits[byte >> 4] | (bits[byte & 15] << 16)
    return _PAIRS[key]


def _check_input(x: torch.Tensor, module: Any) -> torch.dtype:
    K = module.weight.quant_state.shape[1]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"nf4_gemv: x is {x.dtype}; the one-row NF4 product is defined for bfloat16 and float16")
    if x.numel() != K or x.shape[-1] != K:
        raise ValueError(f"nf4_gemv: x has shape {tuple(x.shape)}; expected one row of {K} ([K], [1, K] or [1, 1, K])")
    return x.dtype


@functools.cache
def _kernel() -> Any:
    def load() -> Any:
        from finechat.kernels import nf4_triton

        return nf4_triton

    return checked(load, lambda kernel: None, False, "NF4 one-row kernel", "one-row NF4 steps use bitsandbytes")
