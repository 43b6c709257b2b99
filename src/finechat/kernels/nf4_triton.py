"""The Triton kernel of finechat.kernels.nf4 (the arithmetic is described there). Importing this module needs Triton."""

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
