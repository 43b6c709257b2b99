"""Fused operations for the fast training path, one operation per module, each beside its plain-PyTorch reference.

On CUDA with liger-kernel installed (the optional extra `gpu`) the norm, rotary and SwiGLU ops run Liger's Triton
kernels; everywhere else they run their reference, so CPU behaviour is the reference by construction. Equivalence
tests live in tests/test_kernels.py (GPU-marked where a kernel needs CUDA)."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.cache
def liger_ops() -> ModuleType | None:
    """liger_kernel.ops when liger-kernel (and Triton) can be imported, else None."""
    try:
        import liger_kernel.ops as ops
    except Exception:  # ImportError, or Triton failing to initialise without a GPU
        return None
    return ops


def use_liger(*tensors) -> bool:
    """True when every tensor is on CUDA and Liger's kernels are importable."""
    return all(t.is_cuda for t in tensors) and liger_ops() is not None
