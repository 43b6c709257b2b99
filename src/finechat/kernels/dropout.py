"""LoRA-input dropout regenerated from a seed: the keep-mask is never stored, forward and backward recompute it.

Two operations, each one pass over memory on CUDA (Triton, Philox counter-based random numbers):
- masked(x, p, seed) = x * keep, where keep is 1 with probability 1-p (no 1/(1-p): the caller folds that into the
  adapter scale);
- masked_add_(dx, t, p, seed, scale): dx += scale * t * keep, with the same keep as masked() for that seed and size.
The plain-PyTorch versions (CPU, or when Triton is missing) draw keep with torch's generator instead: a different but
equally distributed mask, consistent between forward and backward on one device. Measured on an H200 at 8x1024 on
Mistral-7B, dropout 0.05 cost 95 ms of a 0.81 s step with the plain-PyTorch version (bernoulli, then a multiply)."""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

_BLOCK = 1024
_generators: dict[torch.device, torch.Generator] = {}


def keep_mask(like: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Keep-mask (0 or 1, each 1 with probability 1-p) shaped like `like` from torch's generator: a pure function of
    seed, so forward and backward agree."""
    gen = _generators.get(like.device)
    if gen is None:
        gen = _generators[like.device] = torch.Generator(device=like.device)
    gen.manual_seed(seed)
    return torch.empty_like(like).bernoulli_(1.0 - p, generator=gen)


def masked_reference(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * keep with torch's generator."""
    return x * keep_mask(x, p, seed)


def masked_add_reference(dx: torch.Tensor, t: torch.Tensor, p: float, seed: int, scale: float) -> torch.Tensor:
    """dx += scale * t * keep with torch's generator (keep as masked_reference draws it for t's size)."""
    return dx.addcmul_(t, keep_mask(t, p, seed), value=scale)


def masked(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * keep: one Triton kernel on CUDA, else the reference."""
    if _use_triton(x):
        x = x.contiguous()
        out = torch.empty_like(x)
        _kernels().masked[(triton_cdiv(x.numel()),)](x, out, x.numel(), p, _seed31(seed), BLOCK=_BLOCK)
        return out
    return masked_reference(x, p, seed)


def masked_add_(dx: torch.Tensor, t: torch.Tensor, p: float, seed: int, scale: float) -> torch.Tensor:
    """dx += scale * t * keep in place (dx contiguous, t shaped like dx): one Triton kernel on CUDA, else the
    reference."""
    if _use_triton(dx) and dx.is_contiguous():
        t = t.contiguous()
        _kernels().masked_add[(triton_cdiv(dx.numel()),)](dx, t, dx.numel(), p, _seed31(seed), scale, BLOCK=_BLOCK)
        return dx
    return masked_add_reference(dx, t, p, seed, scale)


def triton_cdiv(n: int) -> int:
    return (n + _BLOCK - 1) // _BLOCK


def _seed31(seed: int) -> int:
    return seed % (2**31 - 1)  # a 32-bit kernel argument whatever seed the caller drew


def _use_triton(x: torch.Tensor) -> bool:
    return x.is_cuda and x.numel() < 2**31 and _kernels() is not None


@functools.cache
def _kernels():
    """The compiled Triton kernels, once they passed a check against the reference arithmetic (else None)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def masked_kernel(x_ptr, out_ptr, n, p, seed, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        keep = tl.rand(seed, offs) >= p
        tl.store(out_ptr + offs, tl.where(keep, x, 0.0).to(x.dtype), mask=inside)

    @triton.jit
    def masked_add_kernel(dx_ptr, t_ptr, n, p, seed, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        dx = tl.load(dx_ptr + offs, mask=inside, other=0.0)
        t = tl.load(t_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        keep = tl.rand(seed, offs) >= p
        out = dx.to(tl.float32) + tl.where(keep, t * scale, 0.0)
        tl.store(dx_ptr + offs, out.to(dx.dtype), mask=inside)

    class Kernels:
        masked = masked_kernel
        masked_add = masked_add_kernel

    if torch.cuda.is_available():
        try:
            _check(Kernels)
        except Exception as e:
            log.warning("Triton dropout failed its check (%s: %s); using torch's dropout mask", type(e).__name__, e)
            return None
    return Kernels


def _check(kernels) -> None:
    """The two kernels agree with each other and keep about 1-p of the elements."""
    n, p, seed, scale = 3 * _BLOCK + 17, 0.25, 1234, 1.5
    ones = torch.ones(n, device="cuda", dtype=torch.bfloat16)
    keep = torch.empty_like(ones)
    kernels.masked[(triton_cdiv(n),)](ones, keep, n, p, seed, BLOCK=_BLOCK)
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    xd = torch.empty_like(x)
    kernels.masked[(triton_cdiv(n),)](x, xd, n, p, seed, BLOCK=_BLOCK)
    dx, t = torch.randn_like(x), torch.randn_like(x)
    want = (dx.float() + scale * t.float() * keep.float()).to(dx.dtype)
    kernels.masked_add[(triton_cdiv(n),)](dx, t, n, p, seed, scale, BLOCK=_BLOCK)
    frac = keep.float().mean().item()
    if not (set(keep.unique().tolist()) <= {0.0, 1.0} and abs(frac - (1 - p)) < 0.05):
        raise ValueError(f"keep fraction {frac:.3f} for p={p}")
    if not (torch.equal(xd, x * keep) and torch.allclose(dx.float(), want.float(), rtol=1e-2, atol=1e-2)):
        raise ValueError("masked and masked_add disagree")
