"""The Triton kernels of finechat.kernels.nf4, finechat.kernels.nf4_matmul and finechat.kernels.nf4_gemv (the
arithmetic is described there).
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
def _nf4_decode(nibble, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15):
    """The NF4 code value of each 4-bit index (int32), by a tree of selects over the 16 values held in registers: a
    gather from the table in memory per weight made the batched kernel latency-bound (round 3: 40 GB/s)."""
    b0, b1, b2, b3 = (nibble & 1) != 0, (nibble & 2) != 0, (nibble & 4) != 0, (nibble & 8) != 0
    l0, l1, l2, l3 = tl.where(b0, c1, c0), tl.where(b0, c3, c2), tl.where(b0, c5, c4), tl.where(b0, c7, c6)
    l4, l5, l6, l7 = tl.where(b0, c9, c8), tl.where(b0, c11, c10), tl.where(b0, c13, c12), tl.where(b0, c15, c14)
    m0, m1, m2, m3 = tl.where(b1, l1, l0), tl.where(b1, l3, l2), tl.where(b1, l5, l4), tl.where(b1, l7, l6)
    return tl.where(b3, tl.where(b2, m3, m2), tl.where(b2, m1, m0))


@triton.jit
def _planes(planes_ptr, rows_in, BN: tl.constexpr):
    """The 8 words of the byte-permute tables as [BN, 1] tensors, for the rows where rows_in (zeros elsewhere): held
    in each thread's own registers. Loaded as scalars, they sat in uniform registers, and the loop copied them into
    ordinary ones before every lookup (32 of 282 SASS instructions per 1,024 weights a warp)."""
    at, inside = planes_ptr + tl.full((BN, 1), 0, tl.int32), rows_in[:, None]
    t0, t1 = tl.load(at, mask=inside, other=0), tl.load(at + 1, mask=inside, other=0)
    t2, t3 = tl.load(at + 2, mask=inside, other=0), tl.load(at + 3, mask=inside, other=0)
    t4, t5 = tl.load(at + 4, mask=inside, other=0), tl.load(at + 5, mask=inside, other=0)
    return t0, t1, t2, t3, t4, t5, tl.load(at + 6, mask=inside, other=0), tl.load(at + 7, mask=inside, other=0)


@triton.jit
def _codes_by_permutes(asm: tl.constexpr, word, planes, dtype: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """(high, low) [BN, BK // 2] in dtype: the code values of the high and low nibbles of the tile's bytes, looked
    up a 32-bit word (4 bytes of packed weights, word [BN, BK // 8]) at a time with the tables of _planes."""
    t0, t1, t2, t3, t4, t5, t6, t7 = planes
    even01, even23, odd01, odd23 = tl.inline_asm_elementwise(
        asm, "=r,=r,=r,=r" + ",r" * 9, [word, t0, t1, t2, t3, t4, t5, t6, t7], dtype=(tl.int32,) * 4, is_pure=True,
        pack=1,
    )  # fmt: skip
    return _unpack_pairs(even01, even23, dtype, BN, BK), _unpack_pairs(odd01, odd23, dtype, BN, BK)


@triton.jit
def _unpack_pairs(first, second, dtype: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """[BN, BK // 8] words of two 16-bit values each (bytes 0-1 of each word of weights, then bytes 2-3) ->
    [BN, BK // 2] values of dtype in byte order."""
    a = (first & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
    b = (first >> 16).to(tl.int16).to(dtype, bitcast=True)
    c = (second & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
    d = (second >> 16).to(tl.int16).to(dtype, bitcast=True)
    # join adds a last axis: join(join(a, c), join(b, d))[..., i, j] is (a, c)[i] for j = 0 and (b, d)[i] for j = 1,
    # so a, b, c, d in row-major order (join(join(a, b), join(c, d)) gave a, c, b, d: the CPU test caught it)
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), (BN, BK // 2))


@triton.jit
def nf4_matmul_kernel(
    x_ptr, packed_ptr, qscale_ptr, scale2_ptr, code2_ptr, offset_ptr, nf4_ptr, planes_ptr, out_ptr, partial_ptr,
    counters_ptr, M, N, K,
    packed1_ptr, qscale1_ptr, scale2_1_ptr, offset1_ptr, N1, packed2_ptr, qscale2_ptr, scale2_2_ptr, offset2_ptr, N2,
    STEPS: tl.constexpr, BLOCKSIZE2: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr, GATHER: tl.constexpr = False, CODES_ASM: tl.constexpr = "",
    SPLITS: tl.constexpr = 1, EVEN: tl.constexpr = False, PARTS: tl.constexpr = 1,
):  # fmt: skip
    """out = x @ W^T for BN output features, in out's dtype. With SPLITS programs along K per output block, each
    writes its float32 partial sums over its K range to partial[split] and counts itself in at counters[block]; the
    last of them adds the SPLITS partial sums in split order (the same order whichever program is last), rounds, writes
    out and sets the count back to 0 for the next call. (A kernel of its own for that sum was 160 more launches a
    batched decode step of Mistral-7B.) Each step covers BK
    weights of K, one quantization block (BLOCK weights, BLOCK // 2 contiguous bytes a row) at a time: the block's
    [BN, BLOCK] code values, in x's dtype, times the [BM, BLOCK] tile of x, and those BM x BN sums times the BN
    blocks' scales (dequantize multiplies each weight by its scale and rounds the product instead; without that
    float32 multiply and repacking per weight, the byte-permute setting's sm_90 loop went from 419 to 378 SASS
    instructions per 1,024 weights a warp). The code values: by a tree of selects in registers; GATHER: loaded from
    the 16-entry table (cached; with num_stages=1 the loads are not staged through shared memory as round 3's
    kernel's were); CODES_ASM: by byte permutes, a 32-bit word of packed weights per call
    (finechat.kernels.nf4_prmt.codes_ptx, its tables at planes_ptr).

    PARTS > 1: up to three weights with the same K, code tables and block sizes side by side in one launch (q, k and
    v of a layer), the second and third given by the *1 and *2 arguments (N1, N2 rows; every N a multiple of BN):
    out [M, N + N1 + N2] holds their products one after the other, and the programs along N take the first weight's
    output blocks, then the second's, then the third's.

    Every pointer starts at the split's first block and moves by a constant per block, and EVEN (N a multiple of BN,
    the splits covering K exactly: Mistral-7B's shapes) drops the bounds checks on the weights: with both, the
    byte-permute loop went from 378 to about 270 SASS instructions per 1,024 weights a warp on sm_90."""
    split = tl.program_id(1)
    program = tl.program_id(0)
    width = N + N1 + N2  # out's row length (N1 = N2 = 0 for one weight)
    first, column = program * 0, program * 0  # this weight's first program along N, its first column of out
    if PARTS > 1:  # noqa: SIM102 (a compile-time branch around a run-time one: not one condition)
        if program >= N // BN:
            if PARTS > 2 and program >= (N + N1) // BN:
                packed_ptr, qscale_ptr, scale2_ptr, offset_ptr = packed2_ptr, qscale2_ptr, scale2_2_ptr, offset2_ptr
                first, column, N = (N + N1) // BN, N + N1, N2
            else:
                packed_ptr, qscale_ptr, scale2_ptr, offset_ptr = packed1_ptr, qscale1_ptr, scale2_1_ptr, offset1_ptr
                first, column, N = N // BN, N, N1
    n = (program - first) * BN + tl.arange(0, BN)  # int32: an NF4 weight has fewer than 2**31 blocks
    m = tl.arange(0, BM)
    n_in, m_in = n < N, m < M
    c0, c1, c2, c3 = tl.load(nf4_ptr), tl.load(nf4_ptr + 1), tl.load(nf4_ptr + 2), tl.load(nf4_ptr + 3)
    c4, c5, c6, c7 = tl.load(nf4_ptr + 4), tl.load(nf4_ptr + 5), tl.load(nf4_ptr + 6), tl.load(nf4_ptr + 7)
    c8, c9, c10, c11 = tl.load(nf4_ptr + 8), tl.load(nf4_ptr + 9), tl.load(nf4_ptr + 10), tl.load(nf4_ptr + 11)
    c12, c13, c14, c15 = tl.load(nf4_ptr + 12), tl.load(nf4_ptr + 13), tl.load(nf4_ptr + 14), tl.load(nf4_ptr + 15)
    offset = tl.load(offset_ptr)
    j = tl.arange(0, BLOCK // 2)  # byte j of a block holds weights k0 + 2j (high nibble) and k0 + 2j + 1 (low)
    w = tl.arange(0, BLOCK // 8)  # word w of a block holds bytes 4w .. 4w + 3
    kk = tl.arange(0, BLOCK)
    k_first = split * (STEPS * BK)  # the split's first weight of K
    block_first = n * (K // BLOCK) + k_first // BLOCK  # [BN]: each row's first block in the split (K % BLOCK == 0)
    qscales = qscale_ptr + block_first
    row_bytes = n.to(tl.int64) * (K // 2) + k_first // 2  # [BN]: each row's first byte in the split
    bytes_ = packed_ptr + row_bytes[:, None] + j[None, :]
    words = packed_ptr.to(tl.pointer_type(tl.int32)) + (row_bytes // 4)[:, None] + w[None, :]
    xs = x_ptr + m[:, None] * K + k_first + kk[None, :]
    planes = _planes(planes_ptr, n_in, BN)
    acc = tl.full((BM, BN), 0.0, tl.float32)  # tl.full, not tl.zeros: a builtin, which the interpreter also runs
    for step in range(STEPS):  # a constant trip count: this split's K range, BK weights per step
        for b in tl.static_range(BK // BLOCK):  # one quantization block of each of the BN rows at a time
            i = step * (BK // BLOCK) + b  # the block's index within the split
            k0 = k_first + i * BLOCK
            block_in = n_in & (k0 < K)  # (unused, and so not computed, when EVEN)
            if EVEN:
                q = tl.load(qscales + i).to(tl.int32)
                scale2 = tl.load(scale2_ptr + (block_first + i) // BLOCKSIZE2)
                x = tl.load(xs + i * BLOCK, mask=m_in[:, None], other=0.0)
            else:
                q = tl.load(qscales + i, mask=block_in, other=0).to(tl.int32)
                scale2 = tl.load(scale2_ptr + (block_first + i) // BLOCKSIZE2, mask=block_in, other=0.0)
                x = tl.load(xs + i * BLOCK, mask=m_in[:, None] & (k0 + kk[None, :] < K), other=0.0)
            scale = tl.load(code2_ptr + q) * scale2 + offset  # [BN]: the block's scale, as bitsandbytes' dequantize
            if CODES_ASM != "":
                if EVEN:
                    word = tl.load(words + i * (BLOCK // 8))
                else:
                    word = tl.load(words + i * (BLOCK // 8), mask=block_in[:, None], other=0)
                high, low = _codes_by_permutes(CODES_ASM, word, planes, x_ptr.dtype.element_ty, BN, BLOCK)
            else:
                if EVEN:
                    byte = tl.load(bytes_ + i * (BLOCK // 2)).to(tl.int32)
                else:
                    byte = tl.load(bytes_ + i * (BLOCK // 2), mask=block_in[:, None], other=0).to(tl.int32)
                if GATHER:
                    high, low = tl.load(nf4_ptr + (byte >> 4)), tl.load(nf4_ptr + (byte & 15))
                else:
                    high = _nf4_decode(byte >> 4, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
                    low = _nf4_decode(byte & 15, c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15)
            x_even, x_odd = tl.split(tl.reshape(x, (BM, BLOCK // 2, 2)))
            # the code values (in x's dtype) times x, and the block's scale times that sum: the scale is applied to
            # BM x BN sums instead of to BN x BLOCK weights (dequantize rounds code x scale per weight instead)
            part = tl.dot(x_even, tl.trans(high.to(x.dtype)), input_precision=PRECISION)
            part = tl.dot(x_odd, tl.trans(low.to(x.dtype)), part, input_precision=PRECISION)
            acc = acc + part * scale[None, :]
    tile = m[:, None] * width + column + n[None, :]
    inside = m_in[:, None] & n_in[None, :]
    if SPLITS == 1:
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=inside)
    else:
        tl.store(partial_ptr + split * M * width + tile, acc, mask=inside)
        # Every thread's partial sums are written before the count goes up (the barrier, then the count's release at
        # GPU scope, as a grid-wide barrier does it), and the last program reads them from L2 after its acquire.
        tl.debug_barrier()
        count = counters_ptr + program
        if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
            total = tl.load(partial_ptr + tile, mask=inside, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLITS):
                total = total + tl.load(
                    partial_ptr + s * M * width + tile, mask=inside, other=0.0, cache_modifier=".cg"
                )
            tl.store(out_ptr + tile, total.to(out_ptr.dtype.element_ty), mask=inside)
            tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")


# ---------------------------------------------------------------------------------------------------------------------
# One row of x times an NF4 weight with bitsandbytes' own arithmetic (finechat.kernels.nf4_gemv describes it)

LANES: tl.constexpr = tl.constexpr(32)  # bitsandbytes' warp: lane l of group g owns weights g*1024 + 32l ... + 31
PAIRS: tl.constexpr = tl.constexpr(16)  # a lane's 16 bytes: two weights each


@triton.jit
def _unzip(t, BN: tl.constexpr, M: tl.constexpr):
    """t [BN, LANES, M] -> (t[..., 0::2], t[..., 1::2]), each [BN, LANES, M // 2]."""
    return tl.split(tl.reshape(t, (BN, LANES, M // 2, 2)))


@triton.jit
def _add_pairs_in_order(acc, t, BN: tl.constexpr):
    """acc + t[..., 0] + t[..., 1] + ... + t[..., 15], one float32 add at a time, left to right (t [BN, LANES, 16])."""
    # Triton cannot index an axis: four even/odd splits give the 16 slices, p0..p15 named by their index
    e, o = _unzip(t, BN, 16)  # p = 2i, 2i + 1
    ee, eo = _unzip(e, BN, 8)  # p = 4i, 4i + 2
    oe, oo = _unzip(o, BN, 8)  # p = 4i + 1, 4i + 3
    eee, eeo = _unzip(ee, BN, 4)  # p = 8i, 8i + 4
    eoe, eoo = _unzip(eo, BN, 4)  # p = 8i + 2, 8i + 6
    oee, oeo = _unzip(oe, BN, 4)  # p = 8i + 1, 8i + 5
    ooe, ooo = _unzip(oo, BN, 4)  # p = 8i + 3, 8i + 7
    p0, p8 = tl.split(eee)
    p4, p12 = tl.split(eeo)
    p2, p10 = tl.split(eoe)
    p6, p14 = tl.split(eoo)
    p1, p9 = tl.split(oee)
    p5, p13 = tl.split(oeo)
    p3, p11 = tl.split(ooe)
    p7, p15 = tl.split(ooo)
    acc = acc + p0 + p1 + p2 + p3 + p4 + p5 + p6 + p7
    return acc + p8 + p9 + p10 + p11 + p12 + p13 + p14 + p15


@triton.jit
def _fold(acc, BN: tl.constexpr, M: tl.constexpr):
    """acc [BN, M] -> acc[:, :M/2] + acc[:, M/2:] (one step of a warp's shuffle-down reduction)."""
    low, high = tl.split(tl.permute(tl.reshape(acc, (BN, 2, M // 2)), (0, 2, 1)))
    return low + high


@triton.jit
def _program_rows(N, BN: tl.constexpr):
    """(n, row): the program's BN output rows, and the rows it reads (past N, the last one again: no masked loads;
    their sums are not stored)."""
    n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    return n, tl.minimum(n, N - 1)


@triton.jit
def _block_scale(code2_ptr, scale2_ptr, offset, qscale, block, g, BLOCKSIZE2: tl.constexpr, FUSED_FMA: tl.constexpr):
    """Each lane's block scale in group g, float32, as bitsandbytes' kernel has it: one fused multiply-add."""
    code2 = tl.load(code2_ptr + qscale.to(tl.int32))
    scale2 = tl.load(scale2_ptr + (block + g * (LANES // 2)).to(tl.uint32) // BLOCKSIZE2)  # unsigned: one shift
    if FUSED_FMA:
        return tl.fma(code2, scale2, offset)
    # Triton's interpreter rounds tl.fma's product: float64 holds it exactly
    return (code2.to(tl.float64) * scale2.to(tl.float64) + offset.to(tl.float64)).to(tl.float32)


@triton.jit
def _store_warp_sums(acc, out_ptr, n, N, BN: tl.constexpr):
    """out[n] = the sum of each row's 32 lanes as a warp's shuffle-down sum adds them, rounded to out's dtype."""
    for width in tl.static_range(5, 1, -1):  # lanes 32 -> 2, halved at each step
        acc = _fold(acc, BN, 1 << width)
    lane0, lane1 = tl.split(acc)
    tl.store(out_ptr + n, (lane0 + lane1 + 0.0).to(out_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def nf4_gemv_kernel(
    x_ptr, packed_ptr, qscale_ptr, scale2_ptr, code2_ptr, offset_ptr, pairs_ptr, out_ptr,
    N, K,
    BLOCKSIZE2: tl.constexpr, BN: tl.constexpr, FUSED_FMA: tl.constexpr,
):  # fmt: skip
    """out[n] = x . W[n] for BN rows n, each as one bitsandbytes warp computes it (K a multiple of 1024)."""
    dtype = x_ptr.dtype.element_ty
    n, row = _program_rows(N, BN)
    lane = tl.arange(0, LANES)
    groups = K // (LANES * 2 * PAIRS)
    row_start = tl.multiple_of(row * (K // 2), 512)  # K % 1024 == 0: a lane's 16 bytes load as one vector
    packed = packed_ptr + row_start[:, None, None] + (lane[:, None] * PAIRS + tl.arange(0, PAIRS)[None, :])[None]
    block = row[:, None] * (K // 64) + lane[None, :] // 2  # [BN, LANES]: a lane's 32 weights sit in one 64-block
    x_of_lane = lane[:, None] * (2 * PAIRS) + tl.arange(0, 2 * PAIRS)[None, :]  # [LANES, 32]
    offset = tl.load(offset_ptr)
    byte = tl.load(packed)  # [BN, LANES, 16]
    qscale = tl.load(qscale_ptr + block)
    acc = tl.full((BN, LANES), 0.0, tl.float32)
    for g in range(groups):
        # the next group's bytes and block codes load while this group is summed (the last group loads itself again)
        ahead = tl.minimum(g + 1, groups - 1)
        byte_ahead = tl.load(packed + ahead * (LANES * PAIRS))
        qscale_ahead = tl.load(qscale_ptr + block + ahead * (LANES // 2))
        scale = _block_scale(code2_ptr, scale2_ptr, offset, qscale, block, g, BLOCKSIZE2, FUSED_FMA)
        scale = scale.to(dtype).to(tl.float32)[:, :, None]
        # one lookup per byte: the code values of both its nibbles, already rounded to dtype, as 16-bit halves
        codes = tl.load(pairs_ptr + byte.to(tl.int32))
        code_even = (codes & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
        code_odd = (codes >> 16).to(tl.int16).to(dtype, bitcast=True)
        w_even = (code_even.to(tl.float32) * scale).to(dtype)
        w_odd = (code_odd.to(tl.float32) * scale).to(dtype)
        xs = tl.load(x_ptr + g * (LANES * 2 * PAIRS) + x_of_lane)
        x_even, x_odd = tl.split(tl.reshape(xs, (LANES, PAIRS, 2)))
        # every product is rounded to dtype before it is added: nothing for the compiler to fuse into an FMA
        q_even = (x_even.to(tl.float32)[None, :, :] * w_even.to(tl.float32)).to(dtype)
        q_odd = (x_odd.to(tl.float32)[None, :, :] * w_odd.to(tl.float32)).to(dtype)
        acc = _add_pairs_in_order(acc, q_even.to(tl.float32) + q_odd.to(tl.float32), BN)
        byte, qscale = byte_ahead, qscale_ahead
    _store_warp_sums(acc, out_ptr, n, N, BN)


@triton.jit
def _quarters(t, BN: tl.constexpr):
    """t [BN, LANES, 4] -> its four [BN, LANES] slices along the last axis, in order."""
    first, second = tl.split(tl.reshape(t, (BN, LANES, 2, 2)))  # indices (0, 2) and (1, 3)
    q0, q2 = tl.split(first)
    q1, q3 = tl.split(second)
    return q0, q1, q2, q3


@triton.jit
def _row_word(asm: tl.constexpr, total, word, x, scale, t0, t1, t2, t3, t4, t5, t6, t7, BN: tl.constexpr):
    """The running sum after one 32-bit word of weights (finechat.kernels.nf4_prmt.row_program); x [BN, LANES, 4]
    the word's x as pairs."""
    x0, x1, x2, x3 = _quarters(x, BN)
    return tl.inline_asm_elementwise(
        asm, "=r" + ",r" * 15, [total, word, x0, x1, x2, x3, scale, t0, t1, t2, t3, t4, t5, t6, t7],
        dtype=tl.float32, is_pure=True, pack=1,
    )  # fmt: skip


@triton.jit
def nf4_gemv_prmt_kernel(
    x_ptr, packed_ptr, qscale_ptr, scale2_ptr, code2_ptr, offset_ptr, planes_ptr, out_ptr,
    N, K,
    BLOCKSIZE2: tl.constexpr, BN: tl.constexpr, FUSED_FMA: tl.constexpr, ROW_ASM: tl.constexpr,
):  # fmt: skip
    """nf4_gemv_kernel's result (bitsandbytes' bits) with the code values looked up by byte permutes and the 16-bit
    products on pairs, a 32-bit word of packed weights (8 weights, 4 bytes in order) per call of ROW_ASM
    (finechat.kernels.nf4_prmt.row_ptx), with its code tables from planes_ptr (nf4_prmt.plane_words, once per lane:
    [LANES, 8])."""
    dtype = x_ptr.dtype.element_ty
    n, row = _program_rows(N, BN)
    lane = tl.arange(0, LANES)
    groups = K // (LANES * 2 * PAIRS)
    words = packed_ptr.to(tl.pointer_type(tl.int32))
    row_start = tl.multiple_of(row * (K // 8), 128)  # K % 1024 == 0: a lane's 4 words load as one vector
    packed = words + row_start[:, None, None] + (lane[:, None] * 4 + tl.arange(0, 4)[None, :])[None]
    x_words = x_ptr.to(tl.pointer_type(tl.int32))
    x_of_lane = (tl.full((BN,), 0, tl.int32)[:, None, None] + lane[None, :, None] * 16) + tl.arange(0, 4)[None, None, :]
    # [BN, LANES]: a lane's 32 weights sit in one 64-block (int32: a weight has fewer than 2**31 blocks)
    block = row.to(tl.int32)[:, None] * (K // 64) + lane[None, :] // 2
    offset = tl.load(offset_ptr)
    # one copy of the tables per lane, so that they load into each thread's registers once: as uniform scalars
    # ptxas copied them into registers again before every prmt (prmt takes at most one uniform operand)
    planes = planes_ptr + tl.full((BN, LANES), 0, tl.int32) + lane[None, :] * 8
    t0, t1, t2, t3 = tl.load(planes), tl.load(planes + 1), tl.load(planes + 2), tl.load(planes + 3)
    t4, t5, t6, t7 = tl.load(planes + 4), tl.load(planes + 5), tl.load(planes + 6), tl.load(planes + 7)
    word = tl.load(packed)  # [BN, LANES, 4]
    qscale = tl.load(qscale_ptr + block)
    acc = tl.full((BN, LANES), 0.0, tl.float32)
    # Unrolled twice (Mistral-7B's K has 4 or 14 groups): the prefetched words need no register moves between
    # groups, 228 -> 217 SASS instructions per 1,024 weights a warp on sm_90
    for g in tl.range(0, groups, loop_unroll_factor=2):
        # the next group's words load while this one is summed (none after the last: a predicate, not a clamp)
        more = g + 1 < groups
        word_ahead = tl.load(packed + (g + 1) * (LANES * 4), mask=more, other=0)
        qscale_ahead = tl.load(qscale_ptr + block + (g + 1) * (LANES // 2), mask=more, other=0)
        scale = _block_scale(code2_ptr, scale2_ptr, offset, qscale, block, g, BLOCKSIZE2, FUSED_FMA)
        scale = scale.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        scale = scale | (scale << 16)  # the scale twice, a pair of dtype
        w0, w1, w2, w3 = _quarters(word, BN)
        xg = x_words + g * (LANES * PAIRS) + x_of_lane
        acc = _row_word(ROW_ASM, acc, w0, tl.load(xg), scale, t0, t1, t2, t3, t4, t5, t6, t7, BN)
        acc = _row_word(ROW_ASM, acc, w1, tl.load(xg + 4), scale, t0, t1, t2, t3, t4, t5, t6, t7, BN)
        acc = _row_word(ROW_ASM, acc, w2, tl.load(xg + 8), scale, t0, t1, t2, t3, t4, t5, t6, t7, BN)
        acc = _row_word(ROW_ASM, acc, w3, tl.load(xg + 12), scale, t0, t1, t2, t3, t4, t5, t6, t7, BN)
        word, qscale = word_ahead, qscale_ahead
    _store_warp_sums(acc, out_ptr, n, N, BN)
