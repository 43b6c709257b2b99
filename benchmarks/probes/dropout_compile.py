"""GPU probe: which formulation of the fused dropout+LoRA-A kernel Triton compiles at Mistral-7B's shape (the
kernel in finechat.kernels.dropout_triton failed with an applyLinearLayout assertion on an H200, Triton 3.6), whether
it is right, and what it costs against the mask kernel + cuBLAS. A diagnosis, not a test."""
import torch
import triton
import triton.language as tl

from finechat.kernels import dropout as d
from finechat.kernels.dropout_triton import draws, kept, tile


@triton.jit
def lane_nospec(acc, x_ptr, a_ptr, rows, col0, M, N, R, draw, threshold, Q: tl.constexpr, RP: tl.constexpr):
    offs, inside, cols = tile(rows, col0, M, N, Q)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    xd = tl.where(kept(draw, threshold), x, 0.0).to(x.dtype)
    r = tl.arange(0, RP)
    a_t = tl.load(a_ptr + r[None, :] * N + cols[:, None], mask=(cols[:, None] < N) & (r[None, :] < R), other=0.0)
    return tl.dot(xd, a_t, acc)


@triton.jit
def lane_trans(acc, x_ptr, a_ptr, rows, col0, M, N, R, draw, threshold, Q: tl.constexpr, RP: tl.constexpr):
    offs, inside, cols = tile(rows, col0, M, N, Q)
    x = tl.load(x_ptr + offs, mask=inside, other=0.0)
    xd = tl.where(kept(draw, threshold), x, 0.0).to(x.dtype)
    r = tl.arange(0, RP)
    a = tl.load(a_ptr + r[:, None] * N + cols[None, :], mask=(r[:, None] < R) & (cols[None, :] < N), other=0.0)
    return tl.dot(xd, tl.trans(a), acc)


@triton.jit(do_not_specialize=["N"])
def kernel_nospec(x_ptr, a_ptr, out_ptr, M, N, R, G, threshold, seed, BM: tl.constexpr, Q: tl.constexpr,
                  RP: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for group in range(0, G):
        r0, r1, r2, r3 = draws(seed, rows, group, G, Q)
        col0 = group * 4 * Q
        acc = lane_nospec(acc, x_ptr, a_ptr, rows, col0, M, N, R, r0, threshold, Q, RP)
        acc = lane_nospec(acc, x_ptr, a_ptr, rows, col0 + Q, M, N, R, r1, threshold, Q, RP)
        acc = lane_nospec(acc, x_ptr, a_ptr, rows, col0 + 2 * Q, M, N, R, r2, threshold, Q, RP)
        acc = lane_nospec(acc, x_ptr, a_ptr, rows, col0 + 3 * Q, M, N, R, r3, threshold, Q, RP)
    r = tl.arange(0, RP)
    inside = (rows[:, None] < M) & (r[None, :] < R)
    tl.store(out_ptr + rows[:, None] * R + r[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def kernel_trans(x_ptr, a_ptr, out_ptr, M, N, R, G, threshold, seed, BM: tl.constexpr, Q: tl.constexpr,
                 RP: tl.constexpr):
    rows = (tl.program_id(0) * BM + tl.arange(0, BM)).to(tl.int64)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for group in range(0, G):
        r0, r1, r2, r3 = draws(seed, rows, group, G, Q)
        col0 = group * 4 * Q
        acc = lane_trans(acc, x_ptr, a_ptr, rows, col0, M, N, R, r0, threshold, Q, RP)
        acc = lane_trans(acc, x_ptr, a_ptr, rows, col0 + Q, M, N, R, r1, threshold, Q, RP)
        acc = lane_trans(acc, x_ptr, a_ptr, rows, col0 + 2 * Q, M, N, R, r2, threshold, Q, RP)
        acc = lane_trans(acc, x_ptr, a_ptr, rows, col0 + 3 * Q, M, N, R, r3, threshold, Q, RP)
    r = tl.arange(0, RP)
    inside = (rows[:, None] < M) & (r[None, :] < R)
    tl.store(out_ptr + rows[:, None] * R + r[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside)


def timed(fn, n=10):
    fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) / n


M, N, R, p, seed = 8192, 4096, 16, 0.05, 1234
x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
A = torch.randn(R, N, device="cuda", dtype=torch.bfloat16)
g = torch.randn(M, R, device="cuda", dtype=torch.bfloat16)
keep = d.masked(torch.ones_like(x), p, seed).float()
ref = (x.float() * keep) @ A.float().t()
print("unfused (mask + cuBLAS) ms", round(timed(lambda: d.masked(x, p, seed) @ A.t()), 3), flush=True)
for name, fn in [
    ("module lora_a", lambda: d._lora_a_fused(x, A, p, seed)),
    ("module lora_a_grad", lambda: d._lora_a_grad_fused(g, x, p, seed, 2.0)),
    ("module lora_dx", lambda: d._lora_dx_fused(g, A, p, seed, 2.0)),
]:
    try:
        torch.cuda.synchronize()
        fn()
        torch.cuda.synchronize()
        print(name, "compiled, ms", round(timed(fn), 3), flush=True)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e).splitlines()[0][:100], flush=True)
bm = d._rows_per_program(M, x.device)
for name, kernel in [("nospec N", kernel_nospec), ("tl.trans", kernel_trans)]:
    out = torch.empty(M, R, device="cuda", dtype=x.dtype)

    def run(kernel=kernel, out=out):
        kernel[(triton.cdiv(M, bm),)](x, A, out, M, N, R, triton.cdiv(N, 128), d._threshold(p), d._seed31(seed),
                                      BM=bm, Q=32, RP=16)

    try:
        run()
        torch.cuda.synchronize()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        print(name, "compiled, rel err", round(err, 5), "ms", round(timed(run), 3), flush=True)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e).splitlines()[0][:100], flush=True)
