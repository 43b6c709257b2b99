"""finechat.kernels against their plain-PyTorch references: the LoRA linear function on CPU (float32) and, on the GPU
machine, every kernel in bf16 (GPU-marked)."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from finechat.kernels import dropout as dropout_ops
from finechat.kernels import lora_linear as ll
from finechat.kernels.rms_norm import rms_norm, rms_norm_reference
from finechat.kernels.rope import apply_rope, apply_rope_reference
from finechat.kernels.swiglu import swiglu, swiglu_reference

gpu = pytest.mark.gpu


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def lora_layer(in_f: int, out_f: int, dropout: float, device="cpu", dtype=torch.float32, nf4=False, bias=False):
    """A peft LoRA layer around a plain or bitsandbytes NF4 linear, with non-zero B so A gets a gradient."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    if nf4:
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(in_f, out_f, bias=bias, compute_dtype=dtype, quant_type="nf4", quant_storage=torch.uint8)
        q.weight = bnb.nn.Params4bit(base.weight.data.clone(), requires_grad=False, quant_type="nf4")
        if bias:
            q.bias = nn.Parameter(base.bias.data.clone(), requires_grad=False)
        base = q.to(device)  # bitsandbytes quantizes on the move
    wrapper = nn.Sequential()
    wrapper.add_module("proj", base)
    model = get_peft_model(
        wrapper, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["proj"], init_lora_weights=False)
    )
    model = model.to(device)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)
    return model.base_model.model.proj


def check_lora_linear(device, dtype, nf4, dropout, tol):
    layer = lora_layer(256, 192, dropout, device, dtype, nf4, bias=True)
    layer.train()
    base, adapter = ll.lora_adapter(layer)
    x = torch.randn(3, 17, 256, device=device, dtype=dtype, requires_grad=True)
    seed = 1234
    y = ll.lora_linear(x, layer, seed)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, adapter.A, adapter.B), g)

    x2 = x.detach().clone().requires_grad_(True)
    keep = dropout_ops.masked(torch.ones_like(x2).reshape(-1, 256), dropout, seed).view_as(x2) if dropout else None
    mask = keep / (1 - dropout) if dropout else None  # the mask the kernel used (Triton's on CUDA)
    weight = ll.dense_weight(base).to(dtype)
    ref = ll.lora_linear_reference(x2, weight, adapter.A, adapter.B, adapter.scale, mask, base.bias)
    want = torch.autograd.grad(ref, (x2, adapter.A, adapter.B), g)
    assert rel_err(y, ref) < tol
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and rel_err(a, b) < tol


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_linear_matches_reference_on_cpu(dropout):
    check_lora_linear("cpu", torch.float32, nf4=False, dropout=dropout, tol=1e-5)


def test_lora_linear_matches_reference_over_nf4_on_cpu():
    check_lora_linear("cpu", torch.float32, nf4=True, dropout=0.0, tol=1e-5)


def check_lora_linears(
    dropout: float,
    nf4: bool = False,
    bias: bool = False,
    device="cpu",
    dtype=torch.float32,
    tol=1e-5,
    apart: bool = False,
):
    """q/k/v-like layers (same input, different widths) through one _LoRALinear: outputs and gradients of x, every A
    and every B as each layer's own reference computes them, with the one dropout mask they share. apart (gate and
    up): each output a dense tensor of its own."""
    gen = torch.Generator().manual_seed(3)
    layers = [lora_layer(256, out, dropout, device, dtype, nf4=nf4, bias=bias) for out in (192, 64, 64)]
    for layer in layers:  # distinct adapters (lora_layer seeds each alike)
        layer.train()
        for name in ("lora_A", "lora_B"):
            weight = getattr(layer, name)["default"].weight
            weight.data = (torch.randn(weight.shape, generator=gen) * 0.1).to(device, dtype)
    found = [ll.lora_adapter(layer) for layer in layers]
    assert ll._groupable(layers, found)
    x = torch.randn(3, 17, 256, generator=gen).to(device, dtype).requires_grad_(True)
    seed = 99
    ys = ll.lora_linears(x, layers, [seed, seed + 1, seed + 2], found, apart=apart)
    assert [y.shape[-1] for y in ys] == [192, 64, 64]
    assert all(y.is_contiguous() for y in ys) == apart
    gs = [torch.randn(y.shape, generator=gen).to(device, dtype) for y in ys]
    params = [t for _, a in found for t in (a.A, a.B)]
    got = torch.autograd.grad(ys, [x, *params], gs)

    x2 = x.detach().clone().requires_grad_(True)
    ones = torch.ones(51, 256, device=device, dtype=dtype)
    keep = dropout_ops.masked(ones, dropout, seed).view_as(x2) if dropout else None  # Triton's mask on CUDA
    mask = keep / (1 - dropout) if dropout else None  # one mask for the three adapters
    refs = [
        ll.lora_linear_reference(x2, ll.dense_weight(base).to(dtype), a.A, a.B, a.scale, mask, base.bias)
        for base, a in found
    ]
    want = torch.autograd.grad(refs, [x2, *params], gs)
    for y, ref in zip(ys, refs, strict=True):
        assert rel_err(y, ref) < tol
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and rel_err(a, b) < tol


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_linears_share_one_pass_and_one_mask(dropout):
    check_lora_linears(dropout)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("nf4", [False, True])
def test_lora_linears_apart_share_the_adapters_pass_with_outputs_of_their_own(dropout, nf4):
    check_lora_linears(dropout, nf4=nf4, bias=nf4, apart=True)


def test_lora_linears_over_nf4_with_bias():
    check_lora_linears(0.0, nf4=True, bias=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("apart", [False, True])
def test_lora_linears_over_nf4_share_one_pass_on_gpu(dropout, apart):
    check_lora_linears(dropout, nf4=True, device="cuda", dtype=torch.bfloat16, tol=2e-2, apart=apart)


def test_lora_linears_that_cannot_share_run_one_by_one():
    """Different dropout: each layer its own lora_linear, with the seeds lora_linear would get one by one."""
    layers = [lora_layer(64, 32, 0.1), lora_layer(64, 16, 0.2)]
    for layer in layers:
        layer.train()
    found = [ll.lora_adapter(layer) for layer in layers]
    assert not ll._groupable(layers, found)
    x = torch.randn(5, 64)
    got = ll.lora_linears(x, layers, [7, 8], found)
    assert all(
        torch.equal(g, ll.lora_linear(x, layer, 7 + i)) for i, (g, layer) in enumerate(zip(got, layers, strict=True))
    )


@pytest.mark.parametrize("nf4", [False, True])
def test_a_recompute_without_output_gives_the_same_gradients(nf4):
    """output=False (the last projection in a checkpointed layer's recompute) skips y, not any gradient."""
    layer = lora_layer(64, 48, 0.1, nf4=nf4)
    layer.train()
    base, adapter = ll.lora_adapter(layer)
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 48)
    wanted = torch.autograd.grad(ll.lora_linear(x, layer, 3), [x, adapter.A, adapter.B], g)
    y = ll.lora_linear(x, layer, 3, output=False)
    assert y.shape == (5, 48) and not y.any()
    got = torch.autograd.grad(y, [x, adapter.A, adapter.B], g)
    assert all(torch.equal(a, b) for a, b in zip(got, wanted, strict=True))


def test_lora_linear_without_dropout_is_peft_layer_output():
    layer = lora_layer(64, 48, dropout=0.0)
    x = torch.randn(5, 64)
    assert rel_err(ll.lora_linear(x, layer), layer(x)) < 1e-6


def test_dropout_mask_is_a_function_of_the_seed():
    x = torch.ones(64, 64)
    a, b, c = (dropout_ops.masked(x, 0.25, s) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(dropout_ops.masked(x, 0.25, torch.tensor(7)), a)  # a seed tensor means its value
    assert torch.equal(a.unique(), torch.tensor([0.0, 1.0]))
    assert abs((a == 0).float().mean().item() - 0.25) < 0.05


def test_plain_linear_falls_back_to_calling_the_layer():
    plain = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    assert ll.lora_adapter(plain) is None and torch.equal(ll.lora_linear(x, plain), plain(x))


def test_ops_fall_back_to_references_on_cpu():
    x, w = torch.randn(2, 3, 16), torch.randn(16)
    assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.equal(swiglu(g, u), swiglu_reference(g, u))
    q, k, cos, sin = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    got, want = apply_rope(q, k, cos, sin), apply_rope_reference(q, k, cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


# GPU: the Triton kernels (Liger) and the CUDA paths, in bf16, against the references on the same inputs.


def _grads(fn, inputs, g):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    # fresh gradients per call: Liger's RoPE backward rotates its incoming gradient in place
    grads = torch.autograd.grad(outs, inputs, tuple(t.clone() for t in (g if isinstance(g, tuple) else (g,))))
    return outs, grads


def require_liger():
    """The dispatching ops below must run Liger's kernels here, or these tests would compare a reference to itself."""
    from finechat.kernels import liger_ops

    assert liger_ops() is not None, "liger-kernel is missing or failed its check: pip install 'finechat[gpu]'"


@gpu
def test_rms_norm_kernel_matches_reference():
    require_liger()
    x = torch.randn(4, 300, 4096, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(torch.bfloat16)
    g = torch.randn_like(x)
    (y,), (dx,) = _grads(lambda a: rms_norm(a, w, 1e-5), [x], g)
    (r,), (dr,) = _grads(lambda a: rms_norm_reference(a, w, 1e-5), [x], g)
    assert rel_err(y, r) < 1e-2 and rel_err(dx, dr) < 1e-2


@gpu
def test_rope_kernel_matches_reference():
    require_liger()
    b, s, d = 2, 512, 128
    q = torch.randn(b, s, 32, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, s, 8, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    angle = torch.arange(s, device="cuda")[:, None] * torch.rand(d // 2, device="cuda")
    cos = torch.cat([angle.cos(), angle.cos()], -1)[None].to(torch.bfloat16)
    sin = torch.cat([angle.sin(), angle.sin()], -1)[None].to(torch.bfloat16)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    got, dgot = _grads(lambda a, c: apply_rope(a, c, cos, sin), [q, k], (gq, gk))
    want, dwant = _grads(lambda a, c: apply_rope_reference(a, c, cos, sin), [q, k], (gq, gk))
    for a, b_ in zip(got + dgot, want + dwant, strict=True):
        assert rel_err(a, b_) < 1e-2


@gpu
def test_swiglu_kernel_matches_reference():
    require_liger()
    g, u = (torch.randn(3, 200, 14336, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    d = torch.randn_like(g)
    (y,), grads = _grads(swiglu, [g, u], d)
    (r,), rgrads = _grads(swiglu_reference, [g, u], d)
    assert rel_err(y, r) < 1e-2 and all(rel_err(a, b) < 1e-2 for a, b in zip(grads, rgrads, strict=True))


@gpu
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_linear_over_nf4_matches_reference_on_gpu(dropout):
    check_lora_linear("cuda", torch.bfloat16, nf4=True, dropout=dropout, tol=2e-2)


# The dropout kernels run on CUDA, or in Triton's interpreter on CPU tensors under TRITON_INTERPRET=1 (float32 only
# there: the interpreter has no bf16 dot). Triton's own random functions become interpretable only when that is set
# before Triton is imported, so CI runs these GPU-marked tests in a pytest of their own (the test after them).


def kernel_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("needs CUDA, or TRITON_INTERPRET=1 to run the Triton kernels in Triton's interpreter")


def kernel_dtypes() -> list[torch.dtype]:
    return [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32]


def require_triton_dropout():
    assert dropout_ops._kernels() is not None, "Triton dropout kernels failed their check"


def philox_keep(seed: int, p: float, rows: int, cols: int) -> np.ndarray:
    """The keep-mask as finechat.kernels.dropout documents it, from a numpy Philox-4x32-10 (Triton's constants)."""
    mask32 = np.uint64(0xFFFFFFFF)
    q, lanes = dropout_ops._Q, 8
    groups = -(-cols // (lanes * q))
    r, c = np.meshgrid(np.arange(rows, dtype=np.uint64), np.arange(cols, dtype=np.uint64), indexing="ij")
    group, j, lane = c // np.uint64(lanes * q), (c // np.uint64(lanes)) % np.uint64(q), c % np.uint64(lanes)
    counter = r * np.uint64(groups * q) + group * np.uint64(q) + j
    c0, c1 = counter & mask32, counter >> np.uint64(32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(seed) & mask32, np.uint64(seed) >> np.uint64(32)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    for _ in range(10):
        prod_b, prod_a = round_b * c2, round_a * c0
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)) ^ c1 ^ k0,
            prod_b & mask32,
            (prod_a >> np.uint64(32)) ^ c3 ^ k1,
            prod_a & mask32,
        )
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask32, (k1 + np.uint64(0xBB67AE85)) & mask32
    output = np.choose((lane // np.uint64(2)).astype(np.int64), [c0, c1, c2, c3])
    draw = (output >> (np.uint64(16) * (lane % np.uint64(2)))) & np.uint64(0xFFFF)  # lane 2l + h: half h of output l
    return draw >= np.uint64(dropout_ops._threshold(p))


@gpu
def test_dropout_mask_is_the_documented_philox_layout():
    require_triton_dropout()
    device = kernel_device()
    rows, cols, p, seed = 37, 2 * dropout_ops._GROUP + 45, 0.3, 987
    keep = dropout_ops.masked(torch.ones(rows, cols, device=device), p, seed)
    assert np.array_equal(keep.cpu().numpy() == 1.0, philox_keep(seed, p, rows, cols))
    assert not torch.equal(keep, dropout_ops.masked(torch.ones(rows, cols, device=device), p, seed + 1))
    # a seed in device memory (as the fast path draws them: one of a layer's consecutive int64s) is the same mask
    seeds = torch.tensor([5, seed, 6], dtype=torch.int64, device=device)
    assert torch.equal(keep, dropout_ops.masked(torch.ones(rows, cols, device=device), p, seeds[1]))


@gpu
@pytest.mark.parametrize("shape,rank", [((70, 300), 8), ((5, 64), 16), ((130, 2 * 128), 5), ((40, 256), 48)])
def test_fused_dropout_ops_match_mask_then_matmul(shape, rank):
    require_triton_dropout()
    device = kernel_device()
    M, N = shape
    p, seed, scale = 0.2, 31337, 1.75
    for dtype in kernel_dtypes():
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        gen = torch.Generator(device=device).manual_seed(0)
        x, A, g = (torch.randn(*s, device=device, generator=gen).to(dtype) for s in ((M, N), (rank, N), (M, rank)))
        keep = dropout_ops.masked(torch.ones_like(x), p, seed).float()
        xd = x.float() * keep
        assert torch.equal(dropout_ops.masked(x, p, seed), (x.float() * keep).to(dtype))
        got = {
            "lora_a": dropout_ops.lora_a(x, A, p, seed),
            "lora_a_grad": dropout_ops.lora_a_grad(g, x, p, seed, scale),
            "lora_dx": dropout_ops.lora_dx(g, A, p, seed, scale),
        }
        want = {
            "lora_a": xd @ A.float().t(),
            "lora_a_grad": scale * (g.float().t() @ xd),
            "lora_dx": scale * keep * (g.float() @ A.float()),
        }
        for name in want:
            assert rel_err(got[name], want[name]) < tol, (name, dtype)
        assert got["lora_a_grad"].dtype == torch.float32 and got["lora_a"].dtype == got["lora_dx"].dtype == dtype


@gpu
def test_unfused_dropout_ops_give_the_fused_results():
    require_triton_dropout()
    device = kernel_device()
    gen = torch.Generator(device=device).manual_seed(0)
    x, A, g = (torch.randn(*s, device=device, generator=gen) for s in ((50, 200), (8, 200), (50, 8)))

    def ops():
        return [
            dropout_ops.lora_a(x, A, 0.1, 5),
            dropout_ops.lora_a_grad(g, x, 0.1, 5, 2.0),
            dropout_ops.lora_dx(g, A, 0.1, 5, 2.0),
        ]

    fused = ops()
    dropout_ops.ENABLED["fused"] = False
    try:
        plain = ops()
    finally:
        dropout_ops.ENABLED["fused"] = True
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(fused, plain, strict=True))


@gpu
def test_triton_dropout_keeps_one_minus_p_at_scale():
    require_triton_dropout()
    if not torch.cuda.is_available():
        pytest.skip("a 16M-element mask is too slow for the interpreter")
    x = torch.randn(4097, 4096, device="cuda", dtype=torch.bfloat16)
    keep = dropout_ops.masked(torch.ones_like(x), 0.05, 42)
    assert set(keep.unique().tolist()) == {0.0, 1.0} and abs(keep.float().mean().item() - 0.95) < 1e-3
    assert torch.equal(dropout_ops.masked(x, 0.05, 42), x * keep)
    # rows and columns far apart are not correlated: the mean of keep*keep' matches (1-p)^2 for shifted copies
    k = keep.float()
    for a, b in ((k[1:], k[:-1]), (k[:, 1:], k[:, :-1]), (k[:, 128:], k[:, :-128]), (k[:, 32:], k[:, :-32])):
        assert abs((a * b).mean().item() - 0.95**2) < 2e-3


def test_dropout_kernels_under_the_interpreter():
    """The GPU-marked dropout tests above, in a pytest started with TRITON_INTERPRET=1 (Triton 3.6's interpreter
    needs numpy < 2.4, which still turns one-element arrays into ints, for the kernels' loops: constraints.txt)."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on CUDA the tests themselves run the kernels")
    tests = "philox_layout or fused_dropout_ops or unfused_dropout_ops"
    command = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-k", tests, "-p", "no:cacheprovider", __file__]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and "6 passed" in done.stdout, done.stdout[-3000:]


def quantized(rows: int, cols: int, dtype: torch.dtype, device: str):
    import bitsandbytes.functional as bnbf

    gen = torch.Generator(device=device).manual_seed(3)
    w = (torch.randn(rows, cols, device=device, generator=gen) * 0.02).to(dtype)
    w[1, :64] *= 40  # one block with a much larger scale
    return bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)


def test_nf4_dequantize_is_bitsandbytes_on_cpu():
    from finechat.kernels import nf4

    packed, qs = quantized(24, 160, torch.float32, "cpu")
    assert torch.equal(nf4.dequantize(packed, qs), nf4.dequantize_reference(packed, qs))


@gpu
@pytest.mark.parametrize("shape", [(320, 1000), (7, 64), (1024, 4096)])
def test_nf4_kernel_gives_bitsandbytes_bits(shape):
    from finechat.kernels import nf4

    device = kernel_device()
    kernel = nf4._kernel()
    assert kernel is not None, "the NF4 kernel failed its check against bitsandbytes"
    # bf16 only on CUDA: Triton's interpreter truncates to bf16 where the GPU rounds to nearest
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if device == "cuda" else [torch.float16, torch.float32]
    for dtype in dtypes:
        packed, qs = quantized(*shape, dtype, device)
        want = nf4.dequantize_reference(packed, qs)
        got = nf4.dequantize(packed, qs) if device == "cuda" else nf4._dequantize(kernel, packed, qs)
        assert got.dtype == dtype and torch.equal(got, want), dtype


@gpu
def test_nf4_kernel_at_mistral_size_on_gpu():
    from finechat.kernels import nf4

    if not torch.cuda.is_available():
        pytest.skip("59M weights are too many for the interpreter")
    packed, qs = quantized(14336, 4096, torch.bfloat16, "cuda")
    assert nf4._kernel() is not None and torch.equal(nf4.dequantize(packed, qs), nf4.dequantize_reference(packed, qs))


def test_nf4_matmul_multiplies_like_dequantize_then_matmul(monkeypatch):
    """finechat.kernels.nf4_matmul (batched decode steps over NF4 weights): several output blocks and K splits, the
    last split shorter, 2 to 16 rows; under Triton's interpreter on CPU."""
    import importlib

    pytest.importorskip("triton")
    from finechat.kernels import nf4_matmul, nf4_triton

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        importlib.reload(nf4_triton)  # its kernels are built for the interpreter from here
    nf4_matmul._kernel.cache_clear()
    try:
        check_nf4_matmul(nf4_matmul)
    finally:  # later tests compile the module's kernels for sm_90: built for the interpreter, their helpers cannot be
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        importlib.reload(nf4_triton)
        nf4_matmul._kernel.cache_clear()


def check_nf4_matmul(nf4_matmul) -> None:
    from types import SimpleNamespace

    device = kernel_device()
    # K = 1088: 17 blocks of 64, so the last 256-wide step of the K range is part-full; 320 x 256: enough output
    # blocks for one K split, whose program writes the rows in their dtype itself (the others add float32 splits)
    for (n, k), dtype, tol in [((192, 1024), torch.float32, 1e-5), ((96, 1088), torch.float32, 1e-5)] + [
        ((192, 1024), torch.float16, 2e-3),
        ((320, 256), torch.float32, 1e-5),
        ((320, 256), torch.float16, 2e-3),
    ]:
        packed, qs = quantized(n, k, dtype, device)
        packed.quant_state = qs
        module = SimpleNamespace(weight=packed, bias=None)
        assert nf4_matmul.applies(module)
        for rows in (2, 5, 16):
            x = torch.randn(rows, 1, k, device=device).to(dtype)
            want = nf4_matmul.nf4_matmul_reference(x, module)
            for name, settings in {"default": {}, **nf4_matmul.SETTINGS}.items():  # off CUDA, and each timed one
                if settings.get("prmt") and (device != "cuda" or dtype == torch.float32):
                    continue  # PTX (the interpreter runs no assembly), 16-bit values (test_prmt_* check it on CPU)
                got = nf4_matmul.nf4_matmul(x, module, **settings)
                assert got.shape == (rows, 1, n) and got.dtype == dtype
                assert rel_err(got, want) < tol, (name, dtype, rows, k)
    with pytest.raises(ValueError, match="at most 16"):
        nf4_matmul.nf4_matmul(torch.randn(17, 1024, device=device).to(dtype), module)
    # q, k and v of a layer in one launch: each weight with its own scales and offset, K split or not
    for k, dtype, tol in ((1024, torch.float32, 1e-5), (256, torch.float32, 1e-5), (1024, torch.float16, 2e-3)):
        parts = []
        for n in (256, 64, 128):
            packed, qs = quantized(n, k, dtype, device)
            packed.quant_state = qs
            parts.append(SimpleNamespace(weight=packed, bias=None))
        assert nf4_matmul.groupable(parts) and not nf4_matmul.groupable(parts + parts[:1])  # at most three
        assert not nf4_matmul.groupable(parts, bn=128)  # k's 64 rows are half a tile
        x = torch.randn(5, 1, k, device=device).to(dtype)
        want = torch.cat([nf4_matmul.nf4_matmul_reference(x, m) for m in parts], dim=-1)
        for name, settings in {"default": {}, **nf4_matmul.SETTINGS}.items():
            if settings.get("prmt") and (device != "cuda" or dtype == torch.float32):
                continue
            got = nf4_matmul.nf4_matmul_parts(x, parts, **settings)
            assert got.shape == (5, 1, 448) and rel_err(got, want) < tol, (name, k, dtype)
            for part, (lo, hi) in zip(parts, ((0, 256), (256, 320), (320, 448)), strict=True):  # each in its place
                alone = nf4_matmul.nf4_matmul_reference(x, part)
                assert rel_err(got[..., lo:hi], alone) < tol, (name, k, lo)


# ---------------------------------------------------------------------------------------------------------------------
# Compiled for an H100/H200 (sm_90) here, without a GPU: Triton's compiler and ptxas run on the CPU. Each kernel is
# compiled as the JIT specializes it at Mistral-7B's shapes (pointers 16-byte aligned, sizes multiples of 16), which
# is where the previous dropout kernels failed on the GPU and the interpreter could not tell.


def compile_for_sm90(fn, types: dict[str, str], constants: dict, aligned: tuple[str, ...], **options):
    """Compile fn to a cubin for sm_90 (returns the compiled kernel); arguments not named in types or constants are
    32-bit integers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = JITFunction(fn.fn)  # a compiler's view of the kernel, even where a test built it for the interpreter
    index = {name: (i,) for i, name in enumerate(fn.arg_names)}
    signature = {name: "constexpr" if name in constants else types.get(name, "i32") for name in fn.arg_names}
    source = ASTSource(
        fn,
        signature,
        constexprs={index[name]: value for name, value in constants.items()},
        attrs={index[name]: [["tt.divisibility", 16]] for name in aligned if name in index},
    )
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options or None)
    assert compiled.asm["cubin"], fn.__name__
    return compiled


def test_dropout_kernels_do_not_compile_again_for_new_seeds():
    """The kernels read their seed from device memory, one of a layer's consecutive int64 seeds; Triton would compile
    a variant per alignment of a specialized pointer, a 1-4 s stall inside a training step. The sizes stay
    specialized."""
    pytest.importorskip("triton")
    from finechat.kernels import dropout_triton as k

    for kernel in (k.masked, k.lora_a, k.lora_a_grad, k.lora_dx):
        params = {p.name: p for p in kernel.params}
        assert params["seed_ptr"].do_not_specialize and not params["N"].do_not_specialize, kernel.fn.__name__


@pytest.mark.parametrize("sizes", ["multiples of 16", "odd"])
def test_training_kernels_compile_for_hopper_at_mistral_shapes(sizes):
    """Mistral-7B's sizes are multiples of 16 (where the earlier kernels failed); odd ones are the GPU tests'."""
    pytest.importorskip("triton")
    from finechat.kernels import dropout_triton as k

    bf16 = "*bf16"
    types = dict(x_ptr=bf16, out_ptr=bf16, a_ptr=bf16, g_ptr=bf16, partial_ptr="*fp32", scale="fp32")
    aligned = (*types.keys() - {"scale"},)
    types["seed_ptr"] = "*i64"  # not aligned: a layer's seeds are consecutive int64s
    if sizes == "multiples of 16":
        aligned += ("M", "N", "R", "G", "rows_per_split")
    compile_for_sm90(k.masked, types, dict(BM=32, Q=dropout_ops._Q), aligned)
    for rp in (16, 64):  # one adapter of rank 16; q, k and v's three as one group (rank 48, padded to 64)
        dot = dict(Q=dropout_ops._Q, RP=rp, PRECISION="tf32")
        compile_for_sm90(k.lora_a, types, dict(BM=32, **dot), aligned)
        compile_for_sm90(k.lora_a_grad, types, dict(BM=64, **dot), aligned)
        compile_for_sm90(k.lora_dx, types, dict(BM=64, **dot), aligned)


def test_batched_nf4_kernel_compiles_for_hopper_at_mistral_shapes():
    pytest.importorskip("triton")
    from finechat.kernels import nf4_matmul, nf4_prmt
    from finechat.kernels.nf4_triton import nf4_matmul_kernel

    types = dict(x_ptr="*bf16", packed_ptr="*u8", qscale_ptr="*u8", scale2_ptr="*fp32", code2_ptr="*fp32")
    types |= dict(offset_ptr="*fp32", nf4_ptr="*fp32", planes_ptr="*i32", out_ptr="*bf16", partial_ptr="*fp32")
    types |= dict(counters_ptr="*i32", packed1_ptr="*u8", qscale1_ptr="*u8", scale2_1_ptr="*fp32")
    types |= dict(offset1_ptr="*fp32", packed2_ptr="*u8", qscale2_ptr="*u8", scale2_2_ptr="*fp32", offset2_ptr="*fp32")
    default = dict(bn=nf4_matmul._BN, bk=nf4_matmul._BK, num_warps=4, num_stages=1)  # the select tree
    for settings in [default, *nf4_matmul.SETTINGS.values()]:  # and every setting the decoder may time
        constants = dict(STEPS=13, BLOCKSIZE2=256, BM=nf4_matmul.MAX_ROWS, BN=settings["bn"], BK=settings["bk"])
        constants |= dict(BLOCK=64, PRECISION="tf32", GATHER=bool(settings.get("gather")))
        constants |= dict(CODES_ASM=nf4_prmt.codes_ptx(torch.bfloat16) if settings.get("prmt") else "")
        launch = dict(num_warps=settings["num_warps"], num_stages=settings["num_stages"])
        for splits, even, parts in ((1, False, 1), (4, False, 1), (1, True, 1), (4, True, 1), (2, True, 3)):
            # the rows written at once or float32 partial sums that the last program adds; bounds checked or not;
            # one weight, or q, k and v in one launch
            compile_for_sm90(
                nf4_matmul_kernel, types, constants | dict(SPLITS=splits, EVEN=even, PARTS=parts),
                (*types, "M", "N", "K", "N1", "N2"), **launch,
            )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# finechat.kernels.nf4_gemv: one row times an NF4 weight with bitsandbytes' roundings and summation order. On random
# data a float32 sum rarely shows in a 16-bit output whatever its order, so `mirrored_nf4` builds inputs where it
# does: lane l + 16 of every group holds lane l's weights, and x there is minus x at lane l for the large entries
# (2^8) and independent for the small ones (2^-4). The large products cancel between the two lanes only up to the
# float32 roundings of each lane's running sum, which are as large as the small products' total: adding in another
# order (products one at a time, pairs reversed, lanes in a row) changes about half of the outputs.


def mirrored_nf4(rows: int, cols: int, dtype: torch.dtype):
    """(x [1, 1, cols], a Linear4bit-like module with a double-quantized NF4 weight [rows, cols])."""
    from types import SimpleNamespace

    import bitsandbytes.functional as bnbf

    gen = torch.Generator().manual_seed(5)
    groups = cols // 1024
    half = torch.randn(rows, groups, 1, 512, generator=gen) * 0.02
    w = half.expand(rows, groups, 2, 512).reshape(rows, cols).to(dtype)
    w[1, :64] *= 40  # one block with a much larger scale
    w[1, 512:576] *= 40
    packed, qs = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    packed.quant_state = qs
    large = torch.rand(groups, 512, generator=gen) < 0.5
    first = torch.randn(groups, 512, generator=gen) * torch.where(large, 2.0**8, 2.0**-4)
    second = torch.where(large, -first, torch.randn(groups, 512, generator=gen) * 2.0**-4)
    x = torch.stack([first, second], 1).reshape(1, 1, cols).to(dtype)
    return x, SimpleNamespace(weight=packed, bias=None)


def warp_by_hand(x: torch.Tensor, module, rows: range, pairs_first: bool = True) -> torch.Tensor:
    """bitsandbytes' one-row product for some rows, written out lane by lane in numpy float32 scalars from the
    16-bit products (torch's own bf16/fp16 multiplies): independent of the emulation's reshapes. pairs_first=False
    adds the products one at a time instead (a wrong order, to show the inputs can tell)."""
    from finechat.kernels import nf4_gemv

    qs = module.weight.quant_state
    K = qs.shape[1]
    scale, nf4 = nf4_gemv._scales(qs).to(x.dtype), qs.code.to(x.dtype)
    packed, xs = module.weight.reshape(-1).long(), x.reshape(K)
    out = []
    for n in rows:
        byte = packed[n * K // 2 : (n + 1) * K // 2]
        block_scale = scale[n * K // 64 : (n + 1) * K // 64].repeat_interleave(32)
        even = (xs[0::2] * (nf4[byte >> 4] * block_scale)).float().numpy()  # each product rounded to x's dtype
        odd = (xs[1::2] * (nf4[byte & 15] * block_scale)).float().numpy()
        lanes = [np.float32(0.0)] * 32
        for g in range(K // 1024):
            for lane in range(32):
                for p in range(16):
                    b = g * 512 + lane * 16 + p
                    if pairs_first:
                        lanes[lane] = np.float32(lanes[lane] + np.float32(even[b] + odd[b]))
                    else:
                        lanes[lane] = np.float32(np.float32(lanes[lane] + even[b]) + odd[b])
        for offset in (16, 8, 4, 2, 1):
            for i in range(offset):
                lanes[i] = np.float32(lanes[i] + lanes[i + offset])
        out.append(torch.tensor(lanes[0] + np.float32(0.0)).to(x.dtype))
    return torch.stack(out)


def test_nf4_gemv_emulation_is_a_close_deterministic_product():
    import bitsandbytes.functional as bnbf

    from finechat.kernels import nf4_gemv

    for dtype in (torch.bfloat16, torch.float16):
        _, module = mirrored_nf4(40, 2048, dtype)
        x = torch.randn(1, 1, 2048, generator=torch.Generator().manual_seed(1)).to(dtype)
        assert nf4_gemv.applies(module)
        got = nf4_gemv.nf4_gemv_emulated(x, module)
        want = x.float() @ bnbf.dequantize_4bit(module.weight, module.weight.quant_state).float().t()
        assert got.shape == (1, 1, 40) and got.dtype == dtype
        assert rel_err(got, want) < 1e-2, dtype
        assert torch.equal(got, nf4_gemv.nf4_gemv_emulated(x, module))
        assert torch.equal(got.reshape(40), nf4_gemv.nf4_gemv_emulated(x.reshape(2048), module, rows_per_chunk=7))
    with pytest.raises(ValueError, match="bfloat16 and float16"):
        nf4_gemv.nf4_gemv_emulated(x.float(), module)
    with pytest.raises(ValueError, match="one row"):
        nf4_gemv.nf4_gemv_emulated(torch.cat([x, x]), module)


def test_nf4_gemv_applies_only_where_bitsandbytes_sums_in_groups_of_1024():
    from types import SimpleNamespace

    from finechat.kernels import nf4_gemv

    for cols in (1024, 1536):
        packed, qs = quantized(8, cols, torch.float16, "cpu")
        packed.quant_state = qs
        assert nf4_gemv.applies(SimpleNamespace(weight=packed, bias=None)) == (cols == 1024)
    assert not nf4_gemv.applies(SimpleNamespace(weight=packed, bias=torch.zeros(8)))


def test_nf4_gemv_emulation_rounds_and_adds_like_the_warp_written_out():
    """bf16 (the dtype of the decode path; the interpreter tests below can only use fp16) against warp_by_hand."""
    from finechat.kernels import nf4_gemv

    for dtype in (torch.bfloat16, torch.float16):
        x, module = mirrored_nf4(6, 2048, dtype)
        got = nf4_gemv.nf4_gemv_emulated(x, module).reshape(6)
        assert torch.equal(got, warp_by_hand(x, module, range(6))), dtype
        if dtype == torch.float16:  # the inputs tell the orders apart (in bf16 fewer outputs show it)
            assert not torch.equal(got, warp_by_hand(x, module, range(6), pairs_first=False))


def test_nf4_block_scales_round_once_like_a_fused_multiply_add():
    """code2[q] * absmax2 + offset rounded once to float32: checked against exact rationals, on a real weight and on a
    case where rounding through float64 first gives the wrong neighbour."""
    from fractions import Fraction
    from types import SimpleNamespace

    from finechat.kernels import nf4_gemv

    def nearest_f32(value: Fraction) -> np.float32:
        guess = np.float32(float(value))
        near = (np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf)))
        return min(near, key=lambda c: (abs(Fraction(float(c)) - value), int(np.array(c).view(np.uint32)) & 1))

    def exact(qs) -> list[np.float32]:
        code2, absmax2 = qs.state2.code.tolist(), qs.state2.absmax.tolist()
        return [
            nearest_f32(Fraction(code2[q]) * Fraction(absmax2[b // qs.state2.blocksize]) + Fraction(qs.offset.item()))
            for b, q in enumerate(qs.absmax.tolist())
        ]

    _, qs = quantized(40, 2048, torch.bfloat16, "cpu")
    assert nf4_gemv._scales(qs).tolist() == exact(qs)
    one = 1 + 2.0**-23
    tie = SimpleNamespace(
        absmax=torch.tensor([0], dtype=torch.uint8),
        offset=torch.tensor(one),
        state2=SimpleNamespace(
            code=torch.tensor([one]), absmax=torch.tensor([2.0**-24 * (1 - 2.0**-23)]), blocksize=256
        ),
    )
    # exact: 1 + 2^-23 + 2^-24 - 2^-70, just below a float32 tie; float64 rounds it onto the tie, then to 1 + 2^-22
    assert nf4_gemv._scales(tie).item() == one == exact(tie)[0]
    assert (tie.state2.code.double() * tie.state2.absmax.double() + one).float().item() == 1 + 2.0**-22


@pytest.fixture
def nf4_gemv_interpreted(monkeypatch):
    """finechat.kernels.nf4_gemv with its kernel built for Triton's interpreter (on CPU)."""
    import importlib

    pytest.importorskip("triton")
    from finechat.kernels import nf4_gemv, nf4_triton

    if torch.cuda.is_available():
        pytest.skip("on CUDA: benchmarks/probes/nf4_gemv.py compares the kernel with bitsandbytes itself")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    importlib.reload(nf4_triton)  # its kernels are built for the interpreter from here
    nf4_gemv._kernel.cache_clear()
    yield nf4_gemv
    nf4_gemv._kernel.cache_clear()


@pytest.mark.parametrize("rows,cols,bn", [(38, 1024, 4), (40, 2048, 8), (3, 1024, 4)])
def test_nf4_gemv_kernel_is_the_emulation_bit_for_bit(nf4_gemv_interpreted, rows, cols, bn):
    """Under the interpreter, in fp16 (it rounds float32 to bf16 by truncation, the GPU to nearest); row counts that
    leave the last program part-full."""
    nf4_gemv = nf4_gemv_interpreted
    x, module = mirrored_nf4(rows, cols, torch.float16)
    plain = torch.randn(cols, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    for xs in (x, plain, plain.reshape(1, cols)):
        got = nf4_gemv.nf4_gemv(xs, module, bn=bn)
        want = nf4_gemv.nf4_gemv_emulated(xs, module)
        assert got.shape == (*xs.shape[:-1], rows) and got.dtype == torch.float16
        assert torch.equal(got, want), (got != want).sum().item()


def nf4_triton_for_sm90(monkeypatch):
    """A copy of finechat.kernels.nf4_triton built for the compiler: its kernels call helpers, which the interpreter
    tests above leave built for the interpreter in the module itself."""
    import importlib.util

    from finechat.kernels import nf4_triton

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("nf4_triton_for_sm90", nf4_triton.__file__)
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    return fresh


def test_nf4_gemv_kernel_compiles_for_hopper_at_mistral_shapes(monkeypatch):
    """bf16, K (4096 or 14336) a runtime multiple of 16; the scale is the kernel's one fused multiply-add (a product
    fused into a sum anywhere else would change bits)."""
    pytest.importorskip("triton")
    from finechat.kernels import nf4_gemv

    nf4_gemv_kernel = nf4_triton_for_sm90(monkeypatch).nf4_gemv_kernel
    types = dict(x_ptr="*bf16", packed_ptr="*u8", qscale_ptr="*u8", scale2_ptr="*fp32", code2_ptr="*fp32")
    types |= dict(offset_ptr="*fp32", pairs_ptr="*i32", out_ptr="*bf16")
    constants = dict(BLOCKSIZE2=256, BN=nf4_gemv._BN, FUSED_FMA=True)
    compiled = compile_for_sm90(nf4_gemv_kernel, types, constants, (*types, "N", "K"))
    assert compiled.asm["ptx"].count("fma.rn.f32") == 1


# finechat.kernels.nf4_prmt: the PTX programs run instruction by instruction in numpy (prmt's documented byte
# selection, 16-bit products rounded once, float32 adds), against the arithmetic they stand for.


def row_program_gemv(x: torch.Tensor, module) -> torch.Tensor:
    """The one-row product as the prmt kernel computes it (nf4_prmt.row_program over each lane's 4 words in order,
    groups in order, then the warp's shuffle-down sum), run on the CPU."""
    from finechat.kernels import nf4_gemv, nf4_prmt

    dtype, qs = x.dtype, module.weight.quant_state
    N, K = qs.shape

    def bits(t: torch.Tensor) -> np.ndarray:  # 16-bit values -> their patterns as uint32
        return t.contiguous().view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)

    words = module.weight.reshape(N, K // 2).numpy().view("<u4").reshape(N, K // 1024, 32, 4)
    x_bits = bits(x.reshape(K)).reshape(K // 1024, 32, 16, 2)
    x_words = x_bits[..., 0] | (x_bits[..., 1] << 16)  # [group, lane, byte]: even weight's x in the low half
    scale = bits(nf4_gemv._scales(qs).to(dtype)).reshape(N, K // 1024, 32 // 2, 1).repeat(2, axis=-1)
    scale = scale.reshape(N, K // 1024, 32)
    tables = {f"${8 + i}": np.uint32(w & 0xFFFFFFFF) for i, w in enumerate(nf4_prmt.plane_words(qs.code, dtype))}
    total = np.zeros((N, 32), dtype=np.float32).view(np.uint32)
    for g in range(K // 1024):
        for j in range(4):
            inputs = {"$1": total, "$2": words[:, g, :, j], "$7": scale[:, g] | (scale[:, g] << 16), **tables}
            inputs |= {f"${3 + p}": np.broadcast_to(x_words[g, :, 4 * j + p], (N, 32)) for p in range(4)}
            total = nf4_prmt.run(nf4_prmt.row_program(), dtype, inputs)["$0"]
    lanes = total.view(np.float32)
    for step in (16, 8, 4, 2, 1):
        lanes = lanes[:, :step] + lanes[:, step : 2 * step]
    return torch.from_numpy(lanes[:, 0] + np.float32(0.0)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prmt_row_program_is_bitsandbytes_arithmetic_bit_for_bit(dtype):
    """On the mirrored inputs, where adding in another order changes about half of the outputs."""
    from finechat.kernels import nf4_gemv

    x, module = mirrored_nf4(6, 2048, dtype)
    plain = torch.randn(2048, generator=torch.Generator().manual_seed(3)).to(dtype)
    for xs in (x, plain):
        got, want = row_program_gemv(xs, module), nf4_gemv.nf4_gemv_emulated(xs, module).reshape(6)
        assert torch.equal(got, want), (got != want).sum().item()


def test_prmt_codes_program_looks_up_every_byte():
    from finechat.kernels import nf4_prmt

    code = torch.linspace(-1, 1, 16) ** 3  # any 16 values: the lookup must not depend on NF4's
    for dtype in (torch.bfloat16, torch.float16):
        byte = np.arange(1024, dtype=np.uint32).reshape(256, 4) % 256  # every byte value at every position
        byte[:, 1:] = np.roll(byte[:, 1:], 7, axis=0)
        word = byte[:, 0] | byte[:, 1] << 8 | byte[:, 2] << 16 | byte[:, 3] << 24
        tables = {f"${5 + i}": np.uint32(w & 0xFFFFFFFF) for i, w in enumerate(nf4_prmt.plane_words(code, dtype))}
        out = nf4_prmt.run(nf4_prmt.codes_program(), dtype, {"$4": word, **tables})
        value = code.to(dtype).view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)
        high, low = value[byte >> 4], value[byte & 15]
        assert (out["$0"] == high[:, 0] | high[:, 1] << 16).all() and (out["$1"] == high[:, 2] | high[:, 3] << 16).all()
        assert (out["$2"] == low[:, 0] | low[:, 1] << 16).all() and (out["$3"] == low[:, 2] | low[:, 3] << 16).all()


@pytest.fixture
def prmt_interpreted(monkeypatch):
    """finechat.kernels.nf4_triton built for Triton's interpreter, which runs no assembly: each call of an
    nf4_prmt program runs it through nf4_prmt.run instead (pack=1, 32-bit operands), so the kernels' loads, word and
    pair layouts and sums are checked on the CPU; the PTX itself is checked on a GPU (and assembled above)."""
    import importlib
    from types import SimpleNamespace

    pytest.importorskip("triton")
    from triton.runtime import interpreter

    from finechat.kernels import nf4_gemv, nf4_matmul, nf4_prmt, nf4_triton

    programs = {}
    for dtype in nf4_prmt.DTYPES:
        programs[nf4_prmt.row_ptx(dtype)] = (nf4_prmt.row_program(), dtype)
        programs[nf4_prmt.codes_ptx(dtype)] = (nf4_prmt.codes_program(), dtype)

    def create_inline_asm(self, asm, constraints, values, types, is_pure, pack):
        ops, dtype = programs[asm]
        outputs = constraints.count("=")
        assert pack == 1 and all(v.data.itemsize == 4 for v in values)
        inputs = {f"${outputs + i}": np.ascontiguousarray(v.data).view(np.uint32) for i, v in enumerate(values)}
        result = nf4_prmt.run(ops, dtype, inputs)
        handles = []
        for i, ty in enumerate(types):
            element = ty.scalar
            data = result[f"${i}"].view(interpreter._get_np_dtype(element)).reshape(values[0].data.shape)
            handles.append(interpreter.TensorHandle(data, element))
        return SimpleNamespace(get_result=handles.__getitem__)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_inline_asm", create_inline_asm)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    importlib.reload(nf4_triton)
    nf4_gemv._kernel.cache_clear()
    nf4_matmul._kernel.cache_clear()
    yield SimpleNamespace(nf4_gemv=nf4_gemv, nf4_matmul=nf4_matmul)
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(nf4_triton)
    nf4_gemv._kernel.cache_clear()
    nf4_matmul._kernel.cache_clear()


def test_prmt_row_kernel_is_the_emulation_bit_for_bit(prmt_interpreted):
    """The one-row kernel with lookup="prmt", in fp16 (the interpreter's bf16 rounds by truncation)."""
    nf4_gemv = prmt_interpreted.nf4_gemv
    for rows, cols, bn in ((38, 1024, 4), (5, 2048, 2)):
        x, module = mirrored_nf4(rows, cols, torch.float16)
        got = nf4_gemv.nf4_gemv(x, module, bn=bn, lookup="prmt")
        want = nf4_gemv.nf4_gemv_emulated(x, module)
        assert got.shape == (1, 1, rows) and torch.equal(got, want), (got != want).sum().item()


def test_prmt_batched_kernel_multiplies_like_dequantize_then_matmul(prmt_interpreted):
    from types import SimpleNamespace

    nf4_matmul = prmt_interpreted.nf4_matmul
    for n, k in ((96, 1088), (64, 1024)):
        packed, qs = quantized(n, k, torch.float16, "cpu")
        packed.quant_state = qs
        module = SimpleNamespace(weight=packed, bias=None)
        for rows in (2, 16):
            x = torch.randn(rows, 1, k).to(torch.float16)
            want = nf4_matmul.nf4_matmul_reference(x, module)
            for name, settings in nf4_matmul.SETTINGS.items():
                if settings.get("prmt"):
                    got = nf4_matmul.nf4_matmul(x, module, **settings)
                    assert rel_err(got, want) < 2e-3, (name, n, k, rows, rel_err(got, want))


def test_prmt_programs_assemble_for_hopper(monkeypatch):
    """The PTX text is what ptxas takes (a compile of the one-row kernel through it, in bf16 and fp16), one program
    per word of weights: 16 permutes and 8 pair products each, four words a group."""
    pytest.importorskip("triton")
    from finechat.kernels import nf4_prmt

    nf4_gemv_prmt_kernel = nf4_triton_for_sm90(monkeypatch).nf4_gemv_prmt_kernel

    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        types = dict(x_ptr=f"*{name}", packed_ptr="*u8", qscale_ptr="*u8", scale2_ptr="*fp32", code2_ptr="*fp32")
        types |= dict(offset_ptr="*fp32", planes_ptr="*i32", out_ptr=f"*{name}")
        constants = dict(BLOCKSIZE2=256, BN=4, FUSED_FMA=True, ROW_ASM=nf4_prmt.row_ptx(dtype))
        compiled = compile_for_sm90(nf4_gemv_prmt_kernel, types, constants, (*types, "N", "K"), num_warps=4)
        ptx = compiled.asm["ptx"]
        # the block scale's one rounding a loop body, as the table kernel's: the loop is unrolled twice, and a third
        # body takes an odd last group
        bodies = ptx.count("fma.rn.f32")
        assert bodies == 3
        pair_products = ptx.count(f"mul.rn.{nf4_prmt.DTYPES[dtype]}x2")
        assert ptx.count("prmt.b32") >= bodies * 4 * 16 and pair_products == bodies * 4 * 8


def test_decode_and_dequantize_kernels_compile_for_hopper():
    """The decode step's other fused kernels and the NF4 dequantization, as Mistral-7B's bf16 decode step and
    training launch them."""
    pytest.importorskip("triton")
    from finechat.kernels import decode_ops, nf4
    from finechat.kernels.nf4_triton import dequantize_nf4

    k = decode_ops._kernels()
    bf16 = "*bf16"
    compile_for_sm90(
        k.add_square, dict(a_ptr=bf16, b_ptr=bf16, s_ptr=bf16, sq_ptr="*fp32"), dict(HAS_B=True, BLOCK=4096),
        ("a_ptr", "b_ptr", "s_ptr", "sq_ptr", "width"),
    )  # fmt: skip
    compile_for_sm90(
        k.rms_apply, dict(s_ptr=bf16, var_ptr="*fp32", w_ptr=bf16, out_ptr=bf16, eps="fp32"),
        dict(PRECISE=True, BLOCK=4096), ("s_ptr", "w_ptr", "out_ptr", "width"),
    )  # fmt: skip
    compile_for_sm90(
        k.add_rms_norm, dict(a_ptr=bf16, b_ptr=bf16, s_ptr=bf16, w_ptr=bf16, out_ptr=bf16, eps="fp32"),
        dict(HAS_B=True, PRECISE=True, BLOCK=4096), ("a_ptr", "b_ptr", "s_ptr", "w_ptr", "out_ptr", "width"),
    )  # fmt: skip
    pointers = ("q_ptr", "k_ptr", "v_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "keys_ptr", "values_ptr")
    compile_for_sm90(
        k.rope_into_cache, {**dict.fromkeys(pointers, bf16), "pos_ptr": "*i64"}, dict(DIM=128, PRECISE=True),
        (*pointers, "pos_ptr", "q_row", "k_row", "v_row", "capacity"),
    )  # fmt: skip
    compile_for_sm90(
        k.silu_mul, dict(g_ptr=bf16, u_ptr=bf16, out_ptr=bf16), dict(PRECISE=True, BLOCK=1024),
        ("g_ptr", "u_ptr", "out_ptr", "n"),
    )  # fmt: skip
    types = dict(packed_ptr="*u8", qscale_ptr="*u8", scale2_ptr="*fp32", code2_ptr="*fp32", offset_ptr="*fp32")
    types |= dict(nf4_ptr="*fp32", out_ptr=bf16, n="i64", n_bytes="i64")
    constants = dict(BLOCKSIZE=64, BLOCKSIZE2=256, BYTES=nf4._BYTES)
    compile_for_sm90(dequantize_nf4, types, constants, (*types, "n", "n_bytes"))


def test_batched_nf4_products_split_k_evenly_at_mistral_shapes():
    """About two programs an SM, every K split as long as the others (no bounds checks along K): 132 SMs (H100 SXM,
    H200), Mistral-7B's products in both tile settings."""
    from finechat.kernels.nf4_matmul import k_splits

    assert k_splits(steps=14336 // 128, n_blocks=4096 // 32, sms=132) == 4  # down projection: was 3 uneven splits
    assert k_splits(steps=14336 // 256, n_blocks=4096 // 64, sms=132) == 7
    assert k_splits(steps=4096 // 128, n_blocks=14336 // 32, sms=132) == 1  # gate and up: enough blocks already
    assert k_splits(steps=4096 // 128, n_blocks=1024 // 32, sms=132) == 16
    assert k_splits(steps=9, n_blocks=3, sms=4) == 3 and k_splits(steps=2, n_blocks=1, sms=132) == 2
