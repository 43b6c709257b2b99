"""The Triton kernels of finechat.kernels.dropout (the mask's layout, the operations and their references are
described there). Importing this module needs Triton.

Every kernel works on whole column groups: one [BM, 8Q] tile per group, its keep-mask assembled from the eight 16-bit
halves of the four outputs of one Philox call per [BM, Q] position, eight neighbouring columns per call. (Four
[BM, Q] lanes, each with its own product, was an earlier form: on Triton 3.6 for sm_90 it failed to compile once the
column count was specialized as a multiple of 16, an assertion in the layout conversion; the one-tile form compiles,
and reads each row of the group in one go.)"""

import triton
import triton.language as tl

# The seed is read from device memory (an int64 in [0, 2^31 - 1)), so that a CUDA graph of a layer draws new masks
# at every replay (finechat.layer_graphs). Triton specializes pointer arguments on their alignment, and the seeds of
# one layer are consecutive int64s (8-byte aligned): without this, a second variant would compile inside a step.
# (The seed was once an integer argument; Triton specialized it on its value and compiled new variants for new
# seeds, 1-4 s inside a training step.)
SEEDS = ["seed_ptr"]


@triton.jit
def draws(seed, rows, group, G, BM: tl.constexpr, Q: tl.constexpr):
    """[BM, 8Q] 16-bit draws for columns group*8Q + [0, 8Q) of these rows (int64): column 8j + 2l + h holds half h
    (0: the low 16 bits, 1: the high) of output l of the Philox counter row*G*Q + group*Q + j. That is the order
    in which the joins below leave the draws, so the reshape moves nothing (an earlier layout, column (2l + h)*Q + j,
    needed a permute that cost lora_a about a fifth of its time: 404 against 314 us a layer at 8x1024, H200)."""
    counter = rows[:, None] * (G * Q) + group * Q + tl.arange(0, Q)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    lanes = tl.join(tl.join(r0, r2), tl.join(r1, r3))  # [BM, Q, 2, 2]: [row, j, a, b] is output l = 2a + b
    halves = tl.join(lanes & 0xFFFF, lanes >> 16)  # [BM, Q, 2, 2, 2]: [row, j, a, b, h]
    return tl.reshape(halves, (BM, 8 * Q))  # column 8j + 4a + 2b + h = 8j + 2l + h


@triton.jit
def kept(draw, threshold):
    return draw.to(tl.int32, bitcast=True) >= threshold


@triton.jit
def tile(rows, col0, M, N, W: tl.constexpr):
    """Offsets, bounds and columns of the [BM, W] tile of an [M, N] row-major matrix at rows, columns col0 + [0, W)."""
    cols = col0 + tl.arange(0, W)
    return rows[:, None] * N + cols[None, :], (rows[:, None] < M) & (cols[None, :] < N), cols


@triton.jit
def dropped(x_ptr, rows, group, M, N, G, threshold, seed, BM: tl.constexpr, Q: tl.constexpr):
    """x * keep on the [BM, 8Q] tile of column group `group` (zeros outside the matrix), with the tile's columns."""
    offs, inside, cols = tile(rows, group * 8 * Q, M, N, 8 * Q)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    return tl.where(kept(draws(seed, rows, group, G, BM, Q), threshold), x, 0.0).to(x.dtype), cols


@triton.jit(do_not_specialize=SEEDS)
def masked(x_ptr, out_ptr, M, N, G, threshold, seed_ptr, BM: tl.constexpr, Q: tl.constexpr):
    seed = tl.load(seed_ptr)
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    group = tl.program_id(1)
    xd, _ = dropped(x_ptr, rows, group, M, N, G, threshold, seed, BM, Q)
    offs, inside, _ = tile(rows, group * 8 * Q, M, N, 8 * Q)
    tl.store(out_ptr + offs, xd, mask=inside)


@triton.jit(do_not_specialize=SEEDS)
def lora_a(
    x_ptr, a_ptr, out_ptr, M, N, R, G, threshold, seed_ptr,
    BM: tl.constexpr, Q: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[M, R] = (x * keep) @ A^T, each program a block of BM whole rows."""
    seed = tl.load(seed_ptr)
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    r = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for group in range(0, G):
        xd, cols = dropped(x_ptr, rows, group, M, N, G, threshold, seed, BM, Q)
        a_t = tl.load(a_ptr + r[None, :] * N + cols[:, None], mask=(cols[:, None] < N) & (r[None, :] < R), other=0.0)
        acc = tl.dot(xd, a_t, acc, input_precision=PRECISION)  # [BM, 8Q] @ [8Q, RP]
    inside = (rows[:, None] < M) & (r[None, :] < R)
    tl.store(out_ptr + rows[:, None] * R + r[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit(do_not_specialize=SEEDS)
def lora_a_grad(
    g_ptr, x_ptr, partial_ptr, M, N, R, G, rows_per_split, threshold, seed_ptr,
    BM: tl.constexpr, Q: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """partial[split, R, N] = g^T @ (x * keep) over this split's rows, for one column group per program."""
    seed = tl.load(seed_ptr)
    group = tl.program_id(0)
    split = tl.program_id(1)
    r = tl.arange(0, RP)
    acc = tl.zeros((RP, 8 * Q), dtype=tl.float32)
    for start in range(0, rows_per_split, BM):
        rows = (split * rows_per_split + start + tl.arange(0, BM)).to(tl.int64)
        g_t = tl.load(g_ptr + rows[None, :] * R + r[:, None], mask=(rows[None, :] < M) & (r[:, None] < R), other=0.0)
        xd, _ = dropped(x_ptr, rows, group, M, N, G, threshold, seed, BM, Q)
        acc = tl.dot(g_t, xd, acc, input_precision=PRECISION)  # [RP, BM] @ [BM, 8Q]
    cols = group * 8 * Q + tl.arange(0, 8 * Q)
    out_ptr = partial_ptr + split.to(tl.int64) * R * N
    tl.store(out_ptr + r[:, None] * N + cols[None, :], acc, mask=(r[:, None] < R) & (cols[None, :] < N))


@triton.jit(do_not_specialize=SEEDS)
def lora_dx(
    out_ptr, g_ptr, a_ptr, M, N, R, G, threshold, seed_ptr, scale,
    BM: tl.constexpr, Q: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """out[M, N] = scale * keep * (g @ A), one [BM, 8Q] tile per program."""
    seed = tl.load(seed_ptr)
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    group = tl.program_id(1)
    r = tl.arange(0, RP)
    g = tl.load(g_ptr + rows[:, None] * R + r[None, :], mask=(rows[:, None] < M) & (r[None, :] < R), other=0.0)
    offs, inside, cols = tile(rows, group * 8 * Q, M, N, 8 * Q)
    a = tl.load(a_ptr + r[:, None] * N + cols[None, :], mask=(r[:, None] < R) & (cols[None, :] < N), other=0.0)
    t = tl.dot(g, a, input_precision=PRECISION)  # [BM, RP] @ [RP, 8Q], float32
    out = tl.where(kept(draws(seed, rows, group, G, BM, Q), threshold), t * scale, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)
