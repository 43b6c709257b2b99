"""The Triton kernels of finechat.kernels.nf4 and finechat.kernels.nf4_matmul (the arithmetic is described there).
Importing this module needs Triton."""

import triton
import triton.language as tl


@triton.jit
def dequantize_nf4(
    packed_ptr,
    qscale_ptr,
    scale2_ptr,
    code2_ptr,
    offset_ptr,
    nf4_ptr,
    out_ptr,
    n,
    n_bytes,
    BLOCKSIZE: tl.constexpr,
    BLOCKSIZE2: tl.constexpr,
    BYTES: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    inside = k < n_bytes
    byte = tl.load(packed_ptr + k, mask=inside, other=0).to(tl.int32)
    block = (2 * k) // BLOCKSIZE  # both weights of a byte share a block (the block size is even)
    q = tl.load(qscale_ptr + block, mask=inside, other=0).to(tl.int32)
    scale = tl.load(code2_ptr + q) * tl.load(scale2_ptr + block // BLOCKSIZE2, mask=inside, other=0.0)
    scale = scale + tl.load(offset_ptr)
    high = tl.load(nf4_ptr + (byte >> 4)) * scale
    low = tl.load(nf4_ptr + (byte & 15)) * scale
    w = tl.interleave(high, low)  # [2 * BYTES]: element 2k is the high nibble of byte k
    i = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + i, w.to(out_ptr.dtype.element_ty), mask=i < n)


@triton.jit
def nf4_matmul_kernel(
    x_ptr, packed_ptr, qscale_ptr, scale2_ptr, code2_ptr, offset_ptr, nf4_ptr, partial_ptr,
    M, N, K,
    STEPS: tl.constexpr, BLOCKSIZE2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    split = tl.program_id(1)
    n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    m = tl.arange(0, BM)
    n_in, m_in = n < N, m < M
    offset = tl.load(offset_ptr)
    acc = tl.full((BM, BN), 0.0, tl.float32)  # tl.full, not tl.zeros: a builtin, which the interpreter also runs
    for step in range(STEPS):  # a constant trip count: this split's K range, one block per step
        k0 = (split * STEPS + step) * BK
        j = tl.arange(0, BK // 2)  # byte j of the block holds weights k0 + 2j (high nibble) and k0 + 2j + 1 (low)
        x_at = x_ptr + m[:, None] * K + k0 + 2 * j[None, :]
        k_in = k0 < K  # the last split may have fewer blocks than STEPS
        x_even = tl.load(x_at, mask=m_in[:, None] & k_in, other=0.0)
        x_odd = tl.load(x_at + 1, mask=m_in[:, None] & k_in, other=0.0)
        byte = tl.load(packed_ptr + n[:, None] * (K // 2) + k0 // 2 + j[None, :], mask=n_in[:, None] & k_in, other=0)
        byte = byte.to(tl.int32)
        block = (n * K + k0) // BK  # BK is the block size: one scale per row of the tile
        q = tl.load(qscale_ptr + block, mask=n_in & k_in, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(scale2_ptr + block // BLOCKSIZE2, mask=n_in & k_in, other=0.0)
        scale = scale + offset
        # each weight as dequantize rounds it: the code value times the block's scale, then the compute dtype
        high = (tl.load(nf4_ptr + (byte >> 4)) * scale[:, None]).to(x_even.dtype)
        low = (tl.load(nf4_ptr + (byte & 15)) * scale[:, None]).to(x_even.dtype)
        acc = tl.dot(x_even, tl.trans(high), acc, input_precision=PRECISION)
        acc = tl.dot(x_odd, tl.trans(low), acc, input_precision=PRECISION)
    at = partial_ptr + split.to(tl.int64) * M * N + m[:, None] * N + n[None, :]
    tl.store(at, acc, mask=m_in[:, None] & n_in[None, :])
