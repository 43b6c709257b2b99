"""LoRA-input dropout regenerated from a seed: the keep-mask is never stored; forward and backward draw it again.

The mask of an input x, seen as a matrix [M, N] (rows = tokens, any leading dimensions flattened), is a pure function
of (seed, p, row, column). A seed is an int or a one-element int64 tensor; the kernels read it from device memory,
so that seeds drawn on the GPU never wait for the host and a CUDA graph of a layer reads new ones at each replay
(finechat.layer_graphs). On CUDA the mask comes from Philox-4x32-10 (Triton's `randint4x`), one call per 8 elements, each
drawing 16 bits: columns are cut into groups of 8*Q; in group g, column g*8Q + 8j + 2l + h (j in 0..Q-1, l in 0..3,
h in 0..1) of row r takes half h (0: low 16 bits, 1: high) of output l of the Philox counter r*G*Q + g*Q + j (G groups
per row), so one call covers eight neighbouring columns. An element is kept when its 16-bit draw is at least
round(p * 2^16), so it is dropped with probability p within 2^-17. Drawing one value per Philox call (`tl.rand`, the
first version) made the kernels arithmetic-bound: 137 ms of GPU time per step at 8x1024 on Mistral-7B (H200), for
~120 GB of memory traffic; one 32-bit value per output (four per call, the second version) still left the fused
kernels bound by Philox's multiplications: 95 ms a step, `lora_a` at a seventh of the card's bandwidth (round 3).

The operations, each one Triton kernel on CUDA and its reference in plain PyTorch beside it:
- masked(x, p, seed) = x * keep (no 1/(1-p): the caller folds it into the adapter scale);
- lora_a(x, A, p, seed) = (x * keep) @ A^T: the adapter's first product with the mask applied while x is read,
  so neither the mask nor the dropped-out copy of x is written (forward and recompute);
- lora_a_grad(g, x, p, seed, scale) = scale * g^T @ (x * keep), in float32: the gradient of A, reading x once;
- lora_dx(g, A, p, seed, scale) = scale * keep * (g @ A): the adapter's part of the input gradient, with the mask
  applied as it is written (g @ A is never written unmasked).
The references (CPU, or when Triton is missing) draw keep with torch's generator instead: a different but equally
distributed mask, consistent between forward and backward on one device. `ENABLED["fused"] = False` makes lora_a,
lora_a_grad and lora_dx use masked() and cuBLAS instead of the fused kernels (to measure them)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch

from finechat.kernels import checked

log = logging.getLogger(__name__)

ENABLED = {"fused": True}  # switched off by `finechat bench train` to measure what the fused kernels buy
# Set when Triton fails to compile a fused kernel (the kernels' earlier four-lane form hit an assertion in Triton 3.6's
# layout conversion on an H200; the tests now compile them for sm_90 on the CPU): from then on the unfused operations
# run (the mask kernel, then a cuBLAS product).
_BROKEN = {"fused": ""}


def _fused() -> bool:
    return ENABLED["fused"] and not _BROKEN["fused"]


def _fused_failed(e: Exception) -> None:
    _BROKEN["fused"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    log.warning("fused dropout kernels failed to compile (%s); using the mask kernel and cuBLAS", _BROKEN["fused"])


_Q = 16  # columns per Philox lane: the mask's layout depends on it, so every kernel uses the same value
_GROUP = 8 * _Q  # columns per group: eight lanes, the 16-bit halves of Philox's four outputs
_generators: dict[torch.device, torch.Generator] = {}
SEED_RANGE = 2**31 - 1  # seeds the kernels read lie in [0, SEED_RANGE)
Seed = int | torch.Tensor  # an int, or a one-element int64 tensor (see _seed_ptr)


# References: plain PyTorch, torch's generator.


def keep_mask(like: torch.Tensor, p: float, seed: Seed) -> torch.Tensor:
    """Keep-mask (0 or 1, each 1 with probability 1-p) shaped like `like` from torch's generator: a pure function of
    seed, so forward and backward agree."""
    gen = _generators.get(like.device)
    if gen is None:
        gen = _generators[like.device] = torch.Generator(device=like.device)
    gen.manual_seed(_seed_int(seed))
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=gen)


def masked_reference(x: torch.Tensor, p: float, seed: Seed) -> torch.Tensor:
    """x * keep with torch's generator."""
    return x * keep_mask(x, p, seed)


def lora_a_reference(x: torch.Tensor, A: torch.Tensor, p: float, seed: Seed) -> torch.Tensor:
    """(x * keep) @ A^T for x [M, N], A [R, N]."""
    return masked_reference(x, p, seed) @ A.t()


def lora_a_grad_reference(g: torch.Tensor, x: torch.Tensor, p: float, seed: Seed, scale: float) -> torch.Tensor:
    """scale * g^T @ (x * keep) in float32, for g [M, R], x [M, N]."""
    return (g.t() @ masked_reference(x, p, seed)).float().mul_(scale)


def lora_dx_reference(g: torch.Tensor, A: torch.Tensor, p: float, seed: Seed, scale: float) -> torch.Tensor:
    """scale * keep * (g @ A) for g [M, R], A [R, N] (keep as masked_reference draws it for an [M, N] input)."""
    return masked_reference(g @ A, p, seed).mul_(scale)


# The operations: Triton on CUDA, else the reference.


def masked(x: torch.Tensor, p: float, seed: Seed) -> torch.Tensor:
    """x * keep: one Triton kernel on CUDA, else the reference."""
    if not _use_triton(x):
        return masked_reference(x, p, seed)
    x2 = _rows(x)
    out = torch.empty_like(x2)
    M, N = x2.shape
    _kernels().masked[(_cdiv(M, 32), _cdiv(N, _GROUP))](
        x2, out, M, N, _cdiv(N, _GROUP), _threshold(p), _seed_ptr(seed, x.device), BM=32, Q=_Q
    )
    return out.view(x.shape)


def lora_a(x: torch.Tensor, A: torch.Tensor, p: float, seed: Seed) -> torch.Tensor:
    """(x * keep) @ A^T for x [M, N] and A [R, N], in x's dtype (float32 accumulation)."""
    if not _use_triton(x):
        return lora_a_reference(x, A, p, seed)
    return _fused_or(lambda: _lora_a_fused(x, A, p, seed), lambda: masked(x, p, seed) @ A.to(x.dtype).t())


def lora_a_grad(g: torch.Tensor, x: torch.Tensor, p: float, seed: Seed, scale: float) -> torch.Tensor:
    """scale * g^T @ (x * keep) in float32, for g [M, R] and x [M, N]."""
    if not _use_triton(x):
        return lora_a_grad_reference(g, x, p, seed, scale)
    return _fused_or(
        lambda: _lora_a_grad_fused(g, x, p, seed, scale),
        lambda: (g.to(x.dtype).t() @ masked(x, p, seed)).float().mul_(scale),
    )


def lora_dx(g: torch.Tensor, A: torch.Tensor, p: float, seed: Seed, scale: float) -> torch.Tensor:
    """scale * keep * (g @ A) for g [M, R] and A [R, N], in g's dtype (float32 products)."""
    if not _use_triton(g):
        return lora_dx_reference(g, A, p, seed, scale)
    return _fused_or(
        lambda: _lora_dx_fused(g, A, p, seed, scale), lambda: masked(g @ A.to(g.dtype), p, seed).mul_(scale)
    )


def _fused_or(fused: Callable[[], torch.Tensor], unfused: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fused() while the fused kernels are on and compile; unfused() (the mask kernel, then cuBLAS) otherwise."""
    if _fused():
        try:
            return fused()
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # Triton's compiler failing on this shape
            _fused_failed(e)
    return unfused()


def _lora_a_fused(x: torch.Tensor, A: torch.Tensor, p: float, seed: Seed) -> torch.Tensor:
    x, A = x.contiguous(), A.to(x.dtype).contiguous()
    M, N = x.shape
    R = A.shape[0]
    out = torch.empty(M, R, device=x.device, dtype=x.dtype)
    bm = _rows_per_program(M, x.device)
    _kernels().lora_a[(_cdiv(M, bm),)](
        x, A, out, M, N, R, _cdiv(N, _GROUP), _threshold(p), _seed_ptr(seed, x.device), **_dot_args(x, R, bm)
    )
    return out


def _lora_a_grad_fused(g: torch.Tensor, x: torch.Tensor, p: float, seed: Seed, scale: float) -> torch.Tensor:
    x, g = x.contiguous(), g.to(x.dtype).contiguous()
    M, N = x.shape
    R = g.shape[1]
    groups = _cdiv(N, _GROUP)
    # Split the rows so that about four programs per SM run; the partial sums add up in a fixed order (no atomics).
    # (32 rows a loop step and four programs per SM: 436 against 543 us a layer at 8x1024 on an H200, against 64 and
    # two; benchmarks/probes/lora_dropout.py.)
    bm = 32
    splits = max(1, min(_cdiv(4 * _sm_count(x.device), groups), _cdiv(M, bm)))
    rows_per_split = _cdiv(_cdiv(M, splits), bm) * bm
    splits = _cdiv(M, rows_per_split)
    partial = torch.empty(splits, R, N, device=x.device, dtype=torch.float32)
    _kernels().lora_a_grad[(groups, splits)](
        g, x, partial, M, N, R, groups, rows_per_split, _threshold(p), _seed_ptr(seed, x.device), **_dot_args(x, R, bm)
    )
    out = partial[0] if splits == 1 else partial.sum(0)
    return out.mul_(scale)


def _lora_dx_fused(g: torch.Tensor, A: torch.Tensor, p: float, seed: Seed, scale: float) -> torch.Tensor:
    g, A = g.contiguous(), A.to(g.dtype).contiguous()
    M, R = g.shape
    N = A.shape[1]
    out = torch.empty(M, N, device=g.device, dtype=g.dtype)
    bm = 64
    _kernels().lora_dx[(_cdiv(M, bm), _cdiv(N, _GROUP))](
        out,
        g,
        A,
        M,
        N,
        R,
        _cdiv(N, _GROUP),
        _threshold(p),
        _seed_ptr(seed, g.device),
        float(scale),
        num_stages=1,  # no loop to pipeline; Triton's default 3 made it slower (326 against 288 us a layer, 8x1024)
        **_dot_args(g, R, bm),
    )
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(-1, x.shape[-1])


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _threshold(p: float) -> int:
    """Drop an element when its 16-bit draw is below this."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability {p} outside [0, 1)")
    return min(round(p * 2**16), 2**16 - 1)


def _seed_ptr(seed: Seed, device: torch.device) -> torch.Tensor:
    """The seed as the kernels read it: an int64 in [0, 2^31 - 1) in device memory. A tensor seed is used as it is
    (the fast path draws its seeds on the device: no copy from the host, and a CUDA graph reads new ones at every
    replay); an int is reduced modulo 2^31 - 1 and copied over (tests, one-off calls)."""
    if torch.is_tensor(seed):
        return seed if seed.device == device else seed.to(device)
    return torch.tensor(seed % SEED_RANGE, dtype=torch.int64, device=device)


def new_seeds(n: int, device: torch.device) -> torch.Tensor:
    """n fresh seeds in [0, 2^31 - 1) on device (int64), drawn with torch's generator of that device."""
    return torch.empty(n, dtype=torch.int64, device=device).random_(0, SEED_RANGE)


def _seed_int(seed: Seed) -> int:
    return int(seed)  # the references: a CPU tensor, or (a fallback) a CUDA one, read back


def _rows_per_program(M: int, device: torch.device) -> int:
    """Rows per program of lora_a (each program reads whole rows, and all of A from L2): the most that still give
    the SMs about two programs each, so one program's loads overlap another's Philox arithmetic (32 at 8x1024 on
    132 SMs); at least 16, tl.dot's smallest side."""
    for bm in (64, 32):
        if _cdiv(M, bm) >= 1.5 * _sm_count(device):
            return bm
    return 16


def _dot_args(x: torch.Tensor, R: int, bm: int) -> dict:
    rp = max(16, 1 << (R - 1).bit_length())  # tl.dot wants every side at least 16
    # float32 inputs: exact float32 products (Triton's default for them is TF32)
    return dict(BM=bm, Q=_Q, RP=rp, PRECISION="ieee" if x.dtype == torch.float32 else "tf32")


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _use_triton(x: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors (and on CPU ones under TRITON_INTERPRET=1, to check the kernels without a GPU)."""
    return (x.is_cuda or (_interpreting() and x.device.type == "cpu")) and _kernels() is not None


@functools.cache
def _kernels():
    """The compiled Triton kernels (finechat.kernels.dropout_triton), once they passed a check against the reference
    arithmetic (else None)."""

    def load():
        from finechat.kernels import dropout_triton

        return dropout_triton

    run_check = torch.cuda.is_available() or _interpreting()
    return checked(load, _check, run_check, "Triton dropout", "using torch's dropout mask")


def _check(kernels) -> None:
    """The kernels agree with each other, keep about 1-p of the elements, and the fused ones compute their products."""
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)  # Triton's interpreter lacks bf16 dot
    M, N, R, p, seed, scale = 67, 2 * _GROUP + 17, 8, 0.25, 1234, 1.5
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen).to(dtype)

    groups, thr, seed_ptr = _cdiv(N, _GROUP), _threshold(p), _seed_ptr(seed, torch.device(device))
    ones = torch.ones(M, N, device=device, dtype=dtype)
    keep = torch.empty_like(ones)
    kernels.masked[(_cdiv(M, 32), groups)](ones, keep, M, N, groups, thr, seed_ptr, BM=32, Q=_Q)
    frac = keep.float().mean().item()
    if not (set(keep.unique().tolist()) <= {0.0, 1.0} and abs(frac - (1 - p)) < 0.05):
        raise ValueError(f"keep fraction {frac:.3f} for p={p}")
    x, A, g, dx = randn(M, N), randn(R, N), randn(M, R), randn(M, N)
    xd = (x * keep).float()
    xa = torch.empty(M, R, device=device, dtype=dtype)
    kernels.lora_a[(_cdiv(M, 16),)](x, A, xa, M, N, R, groups, thr, seed_ptr, **_dot_args(x, R, 16))
    partial = torch.empty(2, R, N, device=device, dtype=torch.float32)
    kernels.lora_a_grad[(groups, 2)](g, x, partial, M, N, R, groups, 64, thr, seed_ptr, **_dot_args(x, R, 64))
    kernels.lora_dx[(_cdiv(M, 64), groups)](dx, g, A, M, N, R, groups, thr, seed_ptr, scale, **_dot_args(dx, R, 64))
    for name, got, want in (
        ("lora_a", xa, xd @ A.float().t()),
        ("lora_a_grad", partial.sum(0), g.float().t() @ xd),
        ("lora_dx", dx, scale * keep.float() * (g.float() @ A.float())),
    ):
        err = ((got.float() - want).norm() / want.norm()).item()
        if not err < 1e-2:
            raise ValueError(f"{name} disagrees with masked: relative error {err:.3g}")
