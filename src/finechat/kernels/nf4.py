"""NF4 weights (bitsandbytes' Linear4bit with double quantization) back to the compute dtype in one kernel.

bitsandbytes' `dequantize_4bit` on a double-quantized weight runs three operations from Python: its 8-bit block
scales decoded by `dequantize_blockwise`, the scales' offset added, then the 4-bit decode; the profiled H200 step at
8x1024 called it 672 times at about 65 µs of host time and 39 µs of GPU time each. `dequantize` does the same
arithmetic in one Triton kernel, in the same float32 order, rounding once to the output dtype:

    scale[b] = code2[qscale[b]] * scale2[b // blocksize2] + offset      (the multiply and add rounded separately)
    w[i]     = nf4[nibble(i)] * scale[i // blocksize]                  (high nibble of byte k is element 2k)

and it is bitwise equal to bitsandbytes' result (checked on a random weight at first use: on any difference it
falls back to bitsandbytes for the whole process). Anything else (FP4, no double quantization, packed storage other
than uint8, CPU) takes bitsandbytes' own `dequantize_4bit`."""

from __future__ import annotations

import functools
from typing import Any

import torch

from finechat.kernels import checked

ENABLED = {"fused": True}  # switched off by `finechat bench train` to measure what the kernel buys
_BYTES = 1024  # packed bytes per program (2048 weights)


def dequantize_reference(packed: torch.Tensor, quant_state: Any) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, quant_state)


def dequantize(packed: torch.Tensor, quant_state: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight of an NF4 tensor: one Triton kernel on CUDA for double-quantized NF4, else bitsandbytes.
    out: a contiguous tensor of the weight's shape and dtype to write it into (e.g. rows of a joined weight)."""
    if not (ENABLED["fused"] and packed.is_cuda and _fused_applies(packed, quant_state) and _kernel() is not None):
        weight = dequantize_reference(packed, quant_state)
        return weight if out is None else out.copy_(weight)
    return _dequantize(_kernel(), packed, quant_state, out)


def _fused_applies(packed: torch.Tensor, qs: Any) -> bool:
    return (
        qs.quant_type == "nf4"
        and qs.nested
        and packed.dtype == torch.uint8
        and packed.shape[0] != 1  # bitsandbytes' transposed [1, n] form returns a transposed result
        and qs.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and qs.absmax.dtype == torch.uint8
        and qs.blocksize % 2 == 0
    )


def _dequantize(kernel, packed: torch.Tensor, qs: Any, out: torch.Tensor | None = None) -> torch.Tensor:
    if out is None:
        out = torch.empty(qs.shape, dtype=qs.dtype, device=packed.device)
    elif not (out.is_contiguous() and out.shape == qs.shape and out.dtype == qs.dtype):
        raise ValueError("dequantize: out must be a contiguous tensor of the weight's shape and dtype")
    n = out.numel()
    n_bytes = (n + 1) // 2
    kernel[(triton_cdiv(n_bytes),)](
        packed,
        qs.absmax,
        qs.state2.absmax,
        qs.state2.code,
        qs.offset if torch.is_tensor(qs.offset) else torch.tensor(float(qs.offset), device=packed.device),
        qs.code,
        out,
        n,
        n_bytes,
        BLOCKSIZE=qs.blocksize,
        BLOCKSIZE2=qs.state2.blocksize,
        BYTES=_BYTES,
        enable_fp_fusion=False,  # bitsandbytes rounds the scale's multiply and add separately
    )
    return out


def triton_cdiv(n: int) -> int:
    return (n + _BYTES - 1) // _BYTES


@functools.cache
def _kernel():
    """The Triton kernel once it reproduced bitsandbytes' bits on a random weight (else None: bitsandbytes runs)."""

    def load():
        from finechat.kernels.nf4_triton import dequantize_nf4

        return dequantize_nf4

    return checked(load, _check, torch.cuda.is_available(), "NF4 kernel", "using bitsandbytes' dequantize")


def _check(kernel) -> None:
    import bitsandbytes.functional as bnbf

    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        w = (torch.randn(320, 1000, device="cuda", generator=gen) * 0.02).to(dtype)
        w[7, :64] *= 50  # a block with a large scale
        packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
        got, want = _dequantize(kernel, packed, qs), dequantize_reference(packed, qs)
        if not torch.equal(got, want):
            bad = (got != want).sum().item()
            raise ValueError(f"{bad} of {want.numel()} {dtype} weights differ from bitsandbytes'")
