"""The Triton kernels of finechat.kernels.decode_ops (what each computes, and how it rounds, is described there).
Importing this module needs Triton; finechat.kernels.decode_ops imports it again when TRITON_INTERPRET changes (tests run
the kernels under Triton's interpreter and compile them for sm_90 in one process)."""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # how the kernels below were built


@triton.jit
def _residual(a_ptr, b_ptr, at, inside, HAS_B: tl.constexpr):
    """a, or a + b rounded to a's dtype as PyTorch's add rounds it, loaded at `at`."""
    a = tl.load(a_ptr + at, mask=inside, other=0.0)
    if HAS_B:
        b = tl.load(b_ptr + at, mask=inside, other=0.0)
        a = (a.to(tl.float32) + b.to(tl.float32)).to(a.dtype)
    return a


@triton.jit
def _input(a_ptr, b_ptr, s_ptr, at, inside, HAS_B: tl.constexpr):
    """_residual, stored to s when it is a sum (a itself is the input otherwise)."""
    a = _residual(a_ptr, b_ptr, at, inside, HAS_B)
    if HAS_B:
        tl.store(s_ptr + at, a, mask=inside)
    return a


@triton.jit
def _normed(s, v, w_ptr, out_ptr, at, offs, inside, PRECISE: tl.constexpr):
    """Store weight * (s * rsqrt(v)) at `at`: the scaled row rounded to s's dtype, then the weight's product."""
    r = libdevice.rsqrt(v) if PRECISE else tl.math.rsqrt(v)
    h = (s.to(tl.float32) * r).to(s.dtype)
    w = tl.load(w_ptr + offs, mask=inside, other=0.0)
    out = w.to(tl.float32) * h.to(tl.float32)
    tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def add_square(a_ptr, b_ptr, s_ptr, sq_ptr, width, HAS_B: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < width
    f = _input(a_ptr, b_ptr, s_ptr, row * width + offs, inside, HAS_B).to(tl.float32)
    tl.store(sq_ptr + row * width + offs, f * f, mask=inside)


@triton.jit
def rms_apply(s_ptr, var_ptr, w_ptr, out_ptr, width, eps, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < width
    s = tl.load(s_ptr + row * width + offs, mask=inside, other=0.0)
    v = tl.load(var_ptr + row).to(tl.float32) + eps
    _normed(s, v, w_ptr, out_ptr, row * width + offs, offs, inside, PRECISE)


@triton.jit
def _add(a, b):
    """The sum's combine function, defined here: tl.sum's own, imported with Triton before the tests switch to the
    interpreter, is then a compiled-mode function the interpreter refuses to call."""
    return a + b


@triton.jit
def add_rms_norm(
    a_ptr, b_ptr, s_ptr, w_ptr, out_ptr, width, eps, HAS_B: tl.constexpr, PRECISE: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """add_square, the mean of the squares (Triton's own summation order) and rms_apply in one program a row."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < width
    a = _input(a_ptr, b_ptr, s_ptr, row * width + offs, inside, HAS_B)
    f = a.to(tl.float32)
    v = tl.reduce(f * f, 0, _add) / width + eps  # not tl.sum: see _add
    _normed(a, v, w_ptr, out_ptr, row * width + offs, offs, inside, PRECISE)


@triton.jit
def rope_into_cache(
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
def silu_mul(g_ptr, u_ptr, out_ptr, n, PRECISE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    g = tl.load(g_ptr + offs, mask=inside, other=0.0)
    u = tl.load(u_ptr + offs, mask=inside, other=0.0)
    x = g.to(tl.float32)
    e = libdevice.exp(-x) if PRECISE else tl.exp(-x)
    act = tl.math.div_rn(x, 1.0 + e).to(g.dtype)
    tl.store(out_ptr + offs, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=inside)
