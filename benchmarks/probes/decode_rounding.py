"""GPU probe: which Triton formulation of exp/rsqrt/add/mul reproduces PyTorch's CUDA kernels bit for bit.
Prints, per op and variant, how many of 2**22 random inputs differ from torch. Not a test; a diagnosis."""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

N = 1 << 22
BLOCK = 1024


@triton.jit
def silu_k(x_ptr, o_ptr, n, V: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if V == 0:
        out = tl.math.div_rn(x, 1.0 + libdevice.exp(-x))
    elif V == 1:
        out = tl.math.div_rn(x, libdevice.add_rn(tl.full(x.shape, 1.0, tl.float32), libdevice.exp(-x)))
    elif V == 2:
        out = tl.math.div_rn(x, 1.0 + tl.exp(-x))
    elif V == 3:
        out = x / (1.0 + libdevice.exp(-x))
    else:
        out = libdevice.div_rn(x, libdevice.add_rn(tl.full(x.shape, 1.0, tl.float32), libdevice.exp(-x)))
    tl.store(o_ptr + offs, out.to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def rsqrt_k(x_ptr, o_ptr, n, V: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=1.0)
    if V == 0:
        out = libdevice.rsqrt(x)
    elif V == 1:
        out = tl.math.rsqrt(x)
    elif V == 2:
        out = libdevice.rsqrt_rn(x)
    else:
        out = tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), tl.sqrt_rn(x))
    tl.store(o_ptr + offs, out, mask=m)


@triton.jit
def rope_k(x_ptr, c_ptr, r_ptr, s_ptr, o_ptr, n, V: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
    c = tl.load(c_ptr + offs, mask=m).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=m).to(tl.float32)
    s = tl.load(s_ptr + offs, mask=m).to(tl.float32)
    if V == 0:
        out = (x * c).to(o_ptr.dtype.element_ty).to(tl.float32) + (r * s).to(o_ptr.dtype.element_ty).to(tl.float32)
    else:
        a = libdevice.mul_rn(x, c).to(o_ptr.dtype.element_ty).to(tl.float32)
        b = libdevice.mul_rn(r, s).to(o_ptr.dtype.element_ty).to(tl.float32)
        out = libdevice.add_rn(a, b)
    tl.store(o_ptr + offs, out.to(o_ptr.dtype.element_ty), mask=m)


def run(kernel, args, out, v):
    kernel[(triton.cdiv(N, BLOCK),)](*args, out, N, V=v, BLOCK=BLOCK)
    return out


torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    x = (torch.randn(N, device="cuda") * 4).to(dtype)
    ref = torch.nn.functional.silu(x)
    for v in range(5):
        got = run(silu_k, (x,), torch.empty_like(x), v)
        print(f"silu {dtype} variant {v}: {(got != ref).sum().item()} differ")
pos = torch.rand(N, device="cuda") * 100 + 1e-3
ref = torch.rsqrt(pos)
for v in range(4):
    got = run(rsqrt_k, (pos,), torch.empty_like(pos), v)
    print(f"rsqrt variant {v}: {(got != ref).sum().item()} differ")
for dtype in (torch.float32, torch.bfloat16):
    x, c, r, s = (torch.randn(N, device="cuda").to(dtype) for _ in range(4))
    ref = (x * c) + (r * s)
    for v in range(2):
        got = run(rope_k, (x, c, r, s), torch.empty_like(x), v)
        print(f"rope {dtype} variant {v}: {(got != ref).sum().item()} differ")
# the mean of squares: torch's x.float().pow(2) against x.float() * x.float()
x = torch.randn(1, 1, 4096, device="cuda").to(torch.bfloat16)
print("pow2 == x*x:", torch.equal(x.float().pow(2), x.float() * x.float()))

# finechat's own fused ops against their references
from finechat.kernels import decode_ops as ops  # noqa: E402

for dtype in (torch.float32, torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(1)

    def rand(*shape, g=g, dtype=dtype):
        return torch.randn(*shape, device="cuda", generator=g).to(dtype)

    a, b = rand(4, 1, 4096), rand(4, 1, 4096)
    s, sq = ops.add_square(a, b)
    rs, rsq = ops.add_square_reference(a, b)
    var = rsq.mean(-1, keepdim=True)
    w = rand(4096)
    print(
        dtype,
        "add",
        (s != rs).sum().item(),
        "sq",
        (sq != rsq).sum().item(),
        "rms",
        (ops.rms_apply(s, var, w, 1e-5) != ops.rms_apply_reference(rs, var, w, 1e-5)).sum().item(),
    )
    ang = torch.rand(4, 64, device="cuda") * 50
    cos, sin = (torch.cat([f(ang), f(ang)], -1).to(dtype) for f in (torch.cos, torch.sin))
    q, k, v = rand(4, 32 * 128), rand(4, 8 * 128), rand(4, 8 * 128)
    keys = torch.zeros(4, 8, 16, 128, device="cuda", dtype=dtype)
    values = torch.zeros_like(keys)
    pos = torch.tensor([1, 5, 9, 15], device="cuda")
    qo = ops.rope_into_cache(q, k, v, cos, sin, pos, keys, values)
    rq = ops.rope_reference(q.view(4, 32, 128), cos, sin)
    rk = ops.rope_reference(k.view(4, 8, 128), cos, sin)
    kd = sum((keys[i, :, pos[i]] != rk[i]).sum().item() for i in range(4))
    print(dtype, "rope q", (qo[:, :, 0] != rq).sum().item(), "rope k", kd)
    gt, up = rand(4, 1, 14336) * 3, rand(4, 1, 14336)
    print(dtype, "silu_mul", (ops.silu_mul(gt, up) != ops.silu_mul_reference(gt, up)).sum().item())
