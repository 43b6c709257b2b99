"""x @ W^T for a few rows of x (2 to 16: the batched decode steps) and a double-quantized NF4 weight W, decoding W in
registers: the weight is read once, as 4-bit, whatever the number of rows.

bitsandbytes 0.50 keeps its fused 4-bit kernel only up to 4 rows for most of Mistral-7B's projections on an H100 or
H200; from 5 rows it writes the whole weight out in bf16 and multiplies that (measured on an H200: a 16-row decode
step took 13.2 ms against 5.3 ms for one row, so 16 NF4 streams gave only 5.5x one stream). Here one program decodes
a [BN, 64] tile of W (the 4-bit values, the block's 8-bit scale through its second-level scale, the offset, as
bitsandbytes' dequantize does) and multiplies it with the rows' [16, 64] tile; the K range is split across programs
when N alone leaves SMs idle, and the partial sums add up in a fixed order.

The rows are not bitwise bitsandbytes' (the products run in another order), as no batched row is bitwise a batch-1
row; the one-row step keeps bitsandbytes' kernel. `finechat.decode` checks the kernel against the reference at load
and falls back to bitsandbytes on a failure or a difference beyond rounding."""

from __future__ import annotations

import functools
from typing import Any

import torch

from finechat.kernels import checked

MAX_ROWS = 16  # tl.dot's smallest side; more rows go through bitsandbytes
_BN = 64  # output features per program


def applies(module: Any) -> bool:
    """True for a bitsandbytes Linear4bit holding double-quantized NF4 with 64-weight blocks and no bias."""
    weight = getattr(module, "weight", None)
    qs = getattr(weight, "quant_state", None)
    if weight is None or qs is None or getattr(module, "bias", None) is not None or not torch.is_tensor(qs.offset):
        return False
    return (
        qs.quant_type == "nf4"
        and qs.nested
        and weight.dtype == torch.uint8
        and qs.absmax.dtype == torch.uint8
        and qs.blocksize == 64
        and len(qs.shape) == 2
        and qs.shape[1] % qs.blocksize == 0
    )


def nf4_matmul_reference(x: torch.Tensor, module: Any) -> torch.Tensor:
    """x @ dequantize(W)^T, through bitsandbytes."""
    import bitsandbytes.functional as bnbf

    weight = module.weight
    return x @ bnbf.dequantize_4bit(weight, weight.quant_state).to(x.dtype).t()


def bitsandbytes_kernel(x: torch.Tensor, module: Any) -> torch.Tensor:
    """x @ W^T through bitsandbytes' own fused 4-bit kernel (SIMT below 8 rows, mma.sync above), whatever the
    number of rows. bitsandbytes' dispatch sends most of Mistral-7B's shapes past 4 rows to dequantize-then-multiply
    on sm_90 instead; finechat.decode times both at load. Raises RuntimeError where this bitsandbytes has no such
    kernel (it is internal to bitsandbytes 0.50's CUDA backend)."""
    impl = _bitsandbytes_kernel()
    if impl is None or x.device.type != "cuda":
        raise RuntimeError("bitsandbytes' fused 4-bit kernel is not available here")
    qs = module.weight.quant_state
    return impl(
        x, module.weight.view(-1, 1), qs.shape, qs.state2.absmax, qs.blocksize, qs.quant_type,
        absmax_8bit=qs.absmax, absmax_code=qs.state2.code, absmax_offset=qs.offset,
    )  # fmt: skip


@functools.cache
def _bitsandbytes_kernel() -> Any:
    try:
        from bitsandbytes.backends.cuda import ops
    except Exception:  # no CUDA build of bitsandbytes
        return None
    return getattr(ops, "_gemm_4bit_kernel_impl", None)


def nf4_matmul(x: torch.Tensor, module: Any) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] for at most MAX_ROWS rows of x, in x's dtype (float32 accumulation)."""
    kernel = _kernel()
    if kernel is None:
        raise RuntimeError("the NF4 matmul kernel is not available (no Triton)")
    weight = module.weight
    qs = weight.quant_state
    N, K = qs.shape
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"nf4_matmul: {M} rows (at most {MAX_ROWS})")
    steps = K // qs.blocksize
    n_blocks = -(-N // _BN)
    splits = max(1, min(steps, -(-2 * _sm_count(x.device) // n_blocks)))
    k_per_split = -(-steps // splits) * qs.blocksize
    splits = -(-K // k_per_split)
    partial = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    kernel[(n_blocks, splits)](
        x2, weight, qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, qs.code, partial, M, N, K,
        STEPS=k_per_split // qs.blocksize, BLOCKSIZE2=qs.state2.blocksize, BM=MAX_ROWS, BN=_BN, BK=qs.blocksize,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    out = partial[0] if splits == 1 else partial.sum(0)
    return out.to(x.dtype).reshape(*x.shape[:-1], N)


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.cache
def _kernel() -> Any:
    def load() -> Any:
        from finechat.kernels.nf4_triton import nf4_matmul_kernel

        return nf4_matmul_kernel

    return checked(load, lambda kernel: None, False, "NF4 matmul kernel", "batched NF4 steps use bitsandbytes")
