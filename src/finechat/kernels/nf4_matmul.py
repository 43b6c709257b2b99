"""x @ W^T for a few rows of x (2 to 16: the batched decode steps) and a double-quantized NF4 weight W, decoding W in
registers: the weight is read once, as 4-bit, whatever the number of rows.

bitsandbytes 0.50 keeps its fused 4-bit kernel only up to 4 rows for most of Mistral-7B's projections on an H100 or
H200; from 5 rows it writes the whole weight out in bf16 and multiplies that (measured on an H200: a 16-row decode
step took 13.2 ms against 5.3 ms for one row, so 16 NF4 streams gave only 5.5x one stream). Here each step of a
program decodes a [BN, BK] tile of W one 64-weight block at a time (the 4-bit values by byte permutes on CUDA,
finechat.kernels.nf4_prmt, or by a gather or a tree of selects over the 16 code values), multiplies the code values
with the rows' [16, 64] tile, and those sums by each block's scale (its 8-bit scale through the second-level scale,
plus the offset, as bitsandbytes' dequantize computes it); the K range is split across
programs when N alone leaves SMs idle, and the partial sums add up in a fixed order. On an H200 the byte permutes made
it faster than bitsandbytes at 4 to 16 rows (round 7 in docs/benchmarks.md: 52.5 against 68.3 us at 14336x4096 and
16 rows); the first version, one gather per weight staged through shared memory, ran at 40 GB/s (round 3).

The rows are not bitwise bitsandbytes' (the products run in another order), as no batched row is bitwise a batch-1
row; one-row steps keep bitsandbytes' arithmetic (finechat.kernels.nf4_gemv). `finechat.decode` checks this kernel
against the reference at load and falls back to bitsandbytes on a failure or a difference beyond rounding."""

from __future__ import annotations

import functools
from typing import Any

import torch

from finechat.kernels import checked, nf4_prmt

MAX_ROWS = 16  # tl.dot's smallest side; more rows go through bitsandbytes
MAX_PARTS = 3  # weights one launch of nf4_matmul_parts multiplies by (a layer's q, k and v)
_BN = 32  # output features per program
_BK = 128  # weights of K per step: two quantization blocks, 64 contiguous bytes of each row
# Tile and launch settings finechat.decode times at load, per weight shape and row count (name -> nf4_matmul's keyword
# arguments); each compiles for sm_90 (tests/test_kernels.py). Round 7 on an H200 (docs/benchmarks.md): the byte-permute
# lookup won 13 of the 16 (rows, shape) pairs, bitsandbytes the other 3, the select tree and the gathers none, so
# only the gather stays beside them (a way that needs no assembly), which keeps the NF4 warm-up under a minute
# (52.5 s with all eight settings).
SETTINGS: dict[str, dict[str, int]] = {
    "finechat-prmt": dict(bn=_BN, bk=_BK, num_warps=4, num_stages=1, prmt=1),
    "finechat-64x256-w8-prmt": dict(bn=64, bk=256, num_warps=8, num_stages=1, prmt=1),
    "finechat-gather": dict(bn=_BN, bk=_BK, num_warps=4, num_stages=1, gather=1),
}


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


def nf4_matmul(x: torch.Tensor, module: Any, **settings: int) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] for at most MAX_ROWS rows of x: nf4_matmul_parts with one weight."""
    return nf4_matmul_parts(x, [module], **settings)


def groupable(modules: list[Any], bn: int = _BN) -> bool:
    """True when nf4_matmul_parts can multiply by these weights in one launch at tile width bn: one weight
    nf4_matmul applies to, or two or three with the same K, code tables and second-level block size, and each N a
    multiple of bn."""
    if not 1 <= len(modules) <= MAX_PARTS or not all(applies(m) for m in modules):
        return False
    if len(modules) == 1:
        return True
    first = modules[0].weight.quant_state
    return _shapes_fit(modules, bn) and all(
        torch.equal(qs.code, first.code) and torch.equal(qs.state2.code, first.state2.code)
        for qs in (m.weight.quant_state for m in modules)
    )


def _shapes_fit(modules: list[Any], bn: int) -> bool:
    """groupable's checks that read no tensor (the code tables' comparison waits for the GPU, which a CUDA graph
    capture forbids: nf4_matmul_parts checks only these on each call)."""
    states = [m.weight.quant_state for m in modules]
    first = states[0]
    return all(
        qs.shape[1] == first.shape[1] and qs.shape[0] % bn == 0 and qs.state2.blocksize == first.state2.blocksize
        for qs in states
    )


def nf4_matmul_parts(
    x: torch.Tensor,
    modules: list[Any],
    bn: int = _BN,
    num_warps: int = 4,
    num_stages: int = 1,
    bk: int = _BK,
    gather: int = 0,
    prmt: int = 0,
) -> torch.Tensor:
    """x [..., K] @ [W1; W2; W3]^T -> [..., N1 + N2 + N3] for at most MAX_ROWS rows of x and the weights of up to
    three modules (groupable ones) in one launch, e.g. a layer's q, k and v products side by side; in x's dtype,
    float32 accumulation. bn, bk, gather, prmt, num_warps and num_stages are the kernel's tile, decoding and launch
    settings (the defaults are what decoding uses off CUDA; finechat.decode times every one of SETTINGS, and so does
    benchmarks/probes/nf4_matmul.py). prmt: the code values by byte permutes, rounded to x's dtype before the scale
    multiplies them (bitsandbytes multiplies the float32 values), for bfloat16 and float16 x on CUDA."""
    kernels = _kernel()
    if kernels is None:
        raise RuntimeError("the NF4 matmul kernel is not available (no Triton)")
    if prmt and x.dtype not in nf4_prmt.DTYPES:
        raise RuntimeError(f"nf4_matmul: prmt=1 looks code values up as 16-bit values; x is {x.dtype}")
    if not 1 <= len(modules) <= MAX_PARTS or (len(modules) > 1 and not _shapes_fit(modules, bn)):
        raise ValueError("nf4_matmul_parts: these weights cannot share a launch (see groupable)")
    weights = [m.weight for m in modules]
    states = [w.quant_state for w in weights]
    qs = states[0]
    K = qs.shape[1]
    sizes = [s.shape[0] for s in states]
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"nf4_matmul: {M} rows (at most {MAX_ROWS})")
    steps = -(-K // bk)
    n_blocks = sum(-(-n // bn) for n in sizes)
    splits = k_splits(steps, n_blocks, _sm_count(x.device))
    steps_per_split = -(-steps // splits)
    width = sum(sizes)
    out = torch.empty(M, width, dtype=x.dtype, device=x.device)
    partial = out if splits == 1 else torch.empty(splits, M, width, dtype=torch.float32, device=x.device)
    parts = [(w, s.absmax, s.state2.absmax, s.offset, s.shape[0]) for w, s in zip(weights, states, strict=True)]
    parts += [(weights[0], qs.absmax, qs.state2.absmax, qs.offset, 0)] * (MAX_PARTS - len(parts))  # unused
    kernels.matmul[(n_blocks, splits)](
        x2, weights[0], qs.absmax, qs.state2.absmax, qs.state2.code, qs.offset, qs.code,
        nf4_prmt.planes(qs.code, x.dtype if prmt else torch.bfloat16), out, partial, _counters(x.device, n_blocks),
        M, sizes[0], K, *parts[1], *parts[2], STEPS=steps_per_split, BLOCKSIZE2=qs.state2.blocksize, BM=MAX_ROWS,
        BN=bn, BK=bk, BLOCK=qs.blocksize, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        GATHER=bool(gather), CODES_ASM=nf4_prmt.codes_ptx(x.dtype) if prmt else "", SPLITS=splits,
        EVEN=all(n % bn == 0 for n in sizes) and splits * steps_per_split * bk == K, PARTS=len(modules),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], width)


def k_splits(steps: int, n_blocks: int, sms: int) -> int:
    """Programs along K per output block: enough for about two programs an SM, and a divisor of the steps, so that
    every split has the same number of them and the kernel needs no bounds checks along K (Mistral-7B's 4096 x 14336
    down projection took 3 splits of 38, 38 and 36 steps, the last one checked, before)."""
    want = max(1, -(-2 * sms // n_blocks))
    return min((d for d in range(1, steps + 1) if steps % d == 0 and d >= want), default=steps)


_COUNTS: dict[torch.device, list[torch.Tensor]] = {}


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """The device's int32 counts of finished K splits, one per output block, all 0 between products (the last
    program of each block sets its count back). Products on one device run one after another on one stream, so they
    share one buffer; a larger one, when needed, is kept beside the earlier ones, which captured CUDA graphs still
    use."""
    kept = _COUNTS.setdefault(device, [])
    if not kept or kept[-1].numel() < size:
        kept.append(torch.zeros(max(4096, size), dtype=torch.int32, device=device))
    return kept[-1]


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.cache
def _kernel() -> Any:
    def load() -> Any:
        from types import SimpleNamespace

        from finechat.kernels.nf4_triton import nf4_matmul_kernel

        return SimpleNamespace(matmul=nf4_matmul_kernel)

    return checked(load, lambda kernel: None, False, "NF4 matmul kernel", "batched NF4 steps use bitsandbytes")
