"""Fused operations for the fast training path, one operation per module, each beside its plain-PyTorch reference.

On CUDA with liger-kernel installed (the optional extra `gpu`) the norm, rotary and SwiGLU ops run Liger's Triton
kernels; everywhere else they run their reference, so CPU behaviour is the reference by construction. Equivalence
tests live in tests/test_kernels.py (GPU-marked where a kernel needs CUDA)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from types import ModuleType
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

ENABLED = {"liger": True}  # switched off by `finechat bench train` to measure what the kernels buy


def checked(load: Callable[[], T], check: Callable[[T], None], run_check: bool, name: str, instead: str) -> T | None:
    """load() once check(it) passed (when run_check), else None: what every fused kernel of the package does before
    its first use. A kernel that cannot load (no Triton, a missing package) is None quietly; one that fails its check
    (a Triton/driver mismatch shows here, once, instead of in the first training step) is None with a warning."""
    try:
        kernel = load()
    except ImportError:
        return None
    except Exception as e:  # e.g. Triton failing to initialise
        log.warning("%s failed to load (%s: %s); %s", name, type(e).__name__, e, instead)
        return None
    if run_check:
        import torch

        try:
            # The first use may come inside no_grad or inference mode (an evaluation, a test): checks may need grads.
            with torch.inference_mode(False), torch.enable_grad():
                check(kernel)
        except Exception as e:
            log.warning("%s failed its check (%s: %s); %s", name, type(e).__name__, e, instead)
            return None
    return kernel


@functools.cache
def liger_ops() -> ModuleType | None:
    """liger_kernel.ops when liger-kernel imports and, on CUDA, passes a small check against the references."""
    import torch

    def load() -> ModuleType:
        import liger_kernel.ops as ops

        return ops

    return checked(load, _check, torch.cuda.is_available(), "liger-kernel", "the fast path uses plain PyTorch ops")


def use_liger(*tensors) -> bool:
    """True when every tensor is on CUDA and Liger's kernels are usable (and not switched off)."""
    return ENABLED["liger"] and all(t.is_cuda for t in tensors) and liger_ops() is not None


def _check(ops: ModuleType) -> None:
    """Forward and backward of each Liger op used here against the reference, in bf16 on small CUDA tensors."""
    import torch

    from finechat.kernels.rms_norm import rms_norm_reference
    from finechat.kernels.rope import apply_rope_reference
    from finechat.kernels.swiglu import swiglu_reference

    def close(name, got, want) -> None:
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        if not err < 2e-2:
            raise ValueError(f"{name}: relative error {err:.3g}")

    def run(fn, *xs):
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
        out = fn(*xs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        return [*outs, *(x.grad for x in xs)]

    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(torch.bfloat16)

    x, w = rand(16, 256), rand(256)
    for a, b in zip(
        run(lambda t: ops.LigerRMSNormFunction.apply(t, w, 1e-5, 0.0, "llama", False), x),
        run(lambda t: rms_norm_reference(t, w, 1e-5), x),
        strict=True,
    ):
        close("rms_norm", a, b)
    q, k = rand(2, 8, 4, 64).transpose(1, 2), rand(2, 8, 2, 64).transpose(1, 2)
    angle = rand(1, 8, 32).float()
    # transformers' rotary tables repeat their first half; Liger reads only that half
    cos, sin = (torch.cat([f(angle), f(angle)], -1).to(torch.bfloat16) for f in (torch.cos, torch.sin))
    for a, b in zip(
        run(lambda s, t: ops.LigerRopeFunction.apply(s, t, cos, sin), q, k),
        run(lambda s, t: apply_rope_reference(s, t, cos, sin), q, k),
        strict=True,
    ):
        close("rope", a, b)
    g, u = rand(16, 512), rand(16, 512)
    for a, b in zip(run(ops.LigerSiLUMulFunction.apply, g, u), run(swiglu_reference, g, u), strict=True):
        close("swiglu", a, b)
