"""The Triton kernels of finechat.kernels.dropout (the mask's layout, the operations and their references are
described there). Importing this module needs Triton."""

import triton
import triton.language as tl


@triton.jit
def draws(seed, rows, group, G, Q: tl.constexpr):
    """Four [BM, Q] blocks of 32-bit draws: lanes 0..3 of column group `group` for these rows (int64)."""
    counter = rows[:, None] * (G * Q) + group * Q + tl.arange(0, Q)[None, :]
    return tl.randint4x(seed, counter)


@triton.jit
def kept(draw, threshold):
    return (draw >> 1).to(tl.int32, bitcast=True) >= threshold


@triton.jit
def tile(rows, col0, M, N, Q: tl.constexpr):
    """Offsets and bounds of the [BM, Q] tile of an [M, N] row-major matrix at rows, columns col0 + [0, Q)."""
    cols = col0 + tl.arange(0, Q)
    return rows[:, None] * N + cols[None, :], (rows[:, None] < M) & (cols[None, :] < N), cols


@triton.jit
def masked_lane(x_ptr, out_ptr, rows, col0, M, N, draw, threshold, Q: tl.constexpr):
    offs, inside, _ = tile(rows, col0, M, N, Q)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    tl.store(out_ptr + offs, tl.where(kept(draw, threshold), x, 0.0).to(x.dtype), mask=inside)


@triton.jit
def masked(x_ptr, out_ptr, M, N, G, threshold, seed, BM: tl.constexpr, Q: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    group = tl.program_id(1)
    r0, r1, r2, r3 = draws(seed, rows, group, G, Q)
    col0 = group * 4 * Q
    masked_lane(x_ptr, out_ptr, rows, col0, M, N, r0, threshold, Q)
    masked_lane(x_ptr, out_ptr, rows, col0 + Q, M, N, r1, threshold, Q)
    masked_lane(x_ptr, out_ptr, rows, col0 + 2 * Q, M, N, r2, threshold, Q)
    masked_lane(x_ptr, out_ptr, rows, col0 + 3 * Q, M, N, r3, threshold, Q)


@triton.jit
def lora_a_lane(
    acc, x_ptr, a_ptr, rows, col0, M, N, R, draw, threshold, Q: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr
):
    offs, inside, cols = tile(rows, col0, M, N, Q)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    xd = tl.where(kept(draw, threshold), x, 0.0).to(x.dtype)
    r = tl.arange(0, RP)
    a_t = tl.load(a_ptr + r[None, :] * N + cols[:, None], mask=(cols[:, None] < N) & (r[None, :] < R), other=0.0)
    return tl.dot(xd, a_t, acc, input_precision=PRECISION)  # [BM, Q] @ [Q, RP]


@triton.jit
def lora_a(
    x_ptr, a_ptr, out_ptr, M, N, R, G, threshold, seed,
    BM: tl.constexpr, Q: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for group in range(0, G):
        r0, r1, r2, r3 = draws(seed, rows, group, G, Q)
        col0 = group * 4 * Q
        acc = lora_a_lane(acc, x_ptr, a_ptr, rows, col0, M, N, R, r0, threshold, Q, RP, PRECISION)
        acc = lora_a_lane(acc, x_ptr, a_ptr, rows, col0 + Q, M, N, R, r1, threshold, Q, RP, PRECISION)
        acc = lora_a_lane(acc, x_ptr, a_ptr, rows, col0 + 2 * Q, M, N, R, r2, threshold, Q, RP, PRECISION)
        acc = lora_a_lane(acc, x_ptr, a_ptr, rows, col0 + 3 * Q, M, N, R, r3, threshold, Q, RP, PRECISION)
    r = tl.arange(0, RP)
    inside = (rows[:, None] < M) & (r[None, :] < R)
    tl.store(out_ptr + rows[:, None] * R + r[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def lora_a_grad_lane(acc, g_t, x_ptr, rows, col0, M, N, draw, threshold, Q: tl.constexpr, PRECISION: tl.constexpr):
    offs, inside, _ = tile(rows, col0, M, N, Q)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    xd = tl.where(kept(draw, threshold), x, 0.0).to(x.dtype)
    return tl.dot(g_t, xd, acc, input_precision=PRECISION)  # [RP, BM] @ [BM, Q]


@triton.jit
def lora_a_grad_store(out_ptr, acc, col0, N, R, Q: tl.constexpr, RP: tl.constexpr):
    cols = col0 + tl.arange(0, Q)
    r = tl.arange(0, RP)
    tl.store(out_ptr + r[:, None] * N + cols[None, :], acc, mask=(r[:, None] < R) & (cols[None, :] < N))


@triton.jit
def lora_a_grad(
    g_ptr, x_ptr, partial_ptr, M, N, R, G, rows_per_split, threshold, seed,
    BM: tl.constexpr, Q: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(0)
    split = tl.program_id(1)
    col0 = group * 4 * Q
    r = tl.arange(0, RP)
    acc0 = tl.zeros((RP, Q), dtype=tl.float32)
    acc1 = tl.zeros((RP, Q), dtype=tl.float32)
    acc2 = tl.zeros((RP, Q), dtype=tl.float32)
    acc3 = tl.zeros((RP, Q), dtype=tl.float32)
    for start in range(0, rows_per_split, BM):
        rows = (split * rows_per_split + start + tl.arange(0, BM)).to(tl.int64)
        g_t = tl.load(g_ptr + rows[None, :] * R + r[:, None], mask=(rows[None, :] < M) & (r[:, None] < R), other=0.0)
        r0, r1, r2, r3 = draws(seed, rows, group, G, Q)
        acc0 = lora_a_grad_lane(acc0, g_t, x_ptr, rows, col0, M, N, r0, threshold, Q, PRECISION)
        acc1 = lora_a_grad_lane(acc1, g_t, x_ptr, rows, col0 + Q, M, N, r1, threshold, Q, PRECISION)
        acc2 = lora_a_grad_lane(acc2, g_t, x_ptr, rows, col0 + 2 * Q, M, N, r2, threshold, Q, PRECISION)
        acc3 = lora_a_grad_lane(acc3, g_t, x_ptr, rows, col0 + 3 * Q, M, N, r3, threshold, Q, PRECISION)
    out_ptr = partial_ptr + split.to(tl.int64) * R * N
    lora_a_grad_store(out_ptr, acc0, col0, N, R, Q, RP)
    lora_a_grad_store(out_ptr, acc1, col0 + Q, N, R, Q, RP)
    lora_a_grad_store(out_ptr, acc2, col0 + 2 * Q, N, R, Q, RP)
    lora_a_grad_store(out_ptr, acc3, col0 + 3 * Q, N, R, Q, RP)


@triton.jit
def lora_dx_lane(
    out_ptr, g, a_ptr, rows, col0, M, N, R, draw, threshold, scale,
    Q: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    offs, inside, cols = tile(rows, col0, M, N, Q)
    r = tl.arange(0, RP)
    a = tl.load(a_ptr + r[:, None] * N + cols[None, :], mask=(r[:, None] < R) & (cols[None, :] < N), other=0.0)
    t = tl.dot(g, a, input_precision=PRECISION)  # [BM, RP] @ [RP, Q], float32
    out = tl.where(kept(draw, threshold), t * scale, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def lora_dx(
    out_ptr, g_ptr, a_ptr, M, N, R, G, threshold, seed, scale,
    BM: tl.constexpr, Q: tl.constexpr, RP: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    group = tl.program_id(1)
    r = tl.arange(0, RP)
    g = tl.load(g_ptr + rows[:, None] * R + r[None, :], mask=(rows[:, None] < M) & (r[None, :] < R), other=0.0)
    r0, r1, r2, r3 = draws(seed, rows, group, G, Q)
    col0 = group * 4 * Q
    lora_dx_lane(out_ptr, g, a_ptr, rows, col0, M, N, R, r0, threshold, scale, Q, RP, PRECISION)
    lora_dx_lane(out_ptr, g, a_ptr, rows, col0 + Q, M, N, R, r1, threshold, scale, Q, RP, PRECISION)
    lora_dx_lane(out_ptr, g, a_ptr, rows, col0 + 2 * Q, M, N, R, r2, threshold, scale, Q, RP, PRECISION)
    lora_dx_lane(out_ptr, g, a_ptr, rows, col0 + 3 * Q, M, N, R, r3, threshold, scale, Q, RP, PRECISION)
