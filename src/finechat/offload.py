"""Activation checkpointing with the checkpoints in pinned host memory.

Each decoder layer runs forward without keeping its activations; only its input is kept, copied to pinned CPU memory
on a side CUDA stream while the layer computes. Backward copies it back (the next layer's input is prefetched while
the current one recomputes), reruns the layer with autograd on, and back-propagates through it. GPU memory then holds
one layer's activations at a time instead of one hidden-state tensor per layer: at 8x1024 on Mistral-7B that is
32 x 64 MiB = 2 GiB less, at 131,072 tokens 32 GiB less. Without CUDA the inputs simply stay where they are."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class _Saved:
    """A checkpoint: on the host (buffer + the event that marks its copy done), or kept as is."""

    key: int
    shape: torch.Size
    dtype: torch.dtype
    host: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None
    kept: torch.Tensor | None = None


class Offloader:
    """Pinned host buffers (one per layer, reused across steps) and the copy stream of one model."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # False keeps checkpoints on the GPU (plain checkpointing; to measure the offload)
        self._buffers: dict[int, torch.Tensor] = {}
        self._latest: dict[int, _Saved] = {}
        self._prefetched: dict[int, tuple[_Saved, torch.Tensor, torch.cuda.Event]] = {}
        self._stream: torch.cuda.Stream | None = None

    def save(self, key: int, x: torch.Tensor, reused: bool = False) -> _Saved:
        """Start copying x to the host (returns at once); keep x on its device when that is not possible (a copy of
        it when reused: its buffer is written again before backward, as a CUDA graph's input is)."""
        if not (x.is_cuda and self.enabled) or (host := self._buffer(key, x)) is None:
            return _Saved(key, x.shape, x.dtype, kept=x.clone() if reused else x)
        stream = self._copy_stream(x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):
            host.copy_(x, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        x.record_stream(stream)  # its memory is not reused before the copy has read it
        saved = _Saved(key, x.shape, x.dtype, host=host, copied=copied)
        self._latest[key] = saved
        return saved

    def load(self, saved: _Saved, device: torch.device) -> torch.Tensor:
        """The saved tensor back on device (waits for its copy); starts fetching the previous layer's input."""
        if saved.kept is not None:
            return saved.kept
        pre = self._prefetched.pop(saved.key, None)
        if pre is not None and pre[0] is saved:
            x, ready = pre[1], pre[2]
        else:
            x, ready = self._fetch(saved, device)
        torch.cuda.current_stream(device).wait_event(ready)
        if self._latest.get(saved.key) is saved:
            del self._latest[saved.key]
        previous = self._latest.get(saved.key - 1)
        if previous is not None and previous.key not in self._prefetched:
            self._prefetched[previous.key] = (previous, *self._fetch(previous, device))
        return x

    def _fetch(self, saved: _Saved, device: torch.device) -> tuple[torch.Tensor, torch.cuda.Event]:
        x = torch.empty(saved.shape, dtype=saved.dtype, device=device)
        stream = self._copy_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # x's memory may have been in use on the main stream
        with torch.cuda.stream(stream):
            x.copy_(saved.host, non_blocking=True)  # type: ignore[arg-type]
            ready = torch.cuda.Event()
            ready.record(stream)
        return x, ready

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _buffer(self, key: int, x: torch.Tensor) -> torch.Tensor | None:
        buf = self._buffers.get(key)
        if buf is None or buf.dtype != x.dtype or buf.numel() < x.numel():
            self._buffers.pop(key, None)
            try:
                buf = torch.empty(x.numel(), dtype=x.dtype, pin_memory=True)
            except RuntimeError:  # host memory exhausted or pinning refused: keep this checkpoint on the GPU
                return None
            self._buffers[key] = buf
        return buf[: x.numel()].view(x.shape)


@dataclass(frozen=True)
class Passes:
    """How a checkpointed function's passes run, where not as run itself (every field optional):
    - first(hidden, copied): the forward, without autograd (e.g. a CUDA graph's replay, finechat.layer_graphs); it
      gets the event of hidden's copy to the host (None when hidden stays where it is), and its input buffers may be
      written again before backward, so a checkpoint kept on the GPU is then a copy;
    - again(hidden): the recompute in backward: the same gradients, but its result is never read, so it may skip
      computing it;
    - backward(hidden, grad): the recompute and the backward at once, returning hidden's gradient and the gradients
      of params (in order), or None to run them eagerly this time;
    - params: every parameter the function's gradients reach. Given, their gradients become the checkpoint's own
      outputs in every backward, eager or not (an eager backward that accumulated them itself would make autograd
      run their accumulation hooks twice, and DDP refuses a parameter marked ready twice)."""

    first: Callable[[torch.Tensor, torch.cuda.Event | None], torch.Tensor] | None = None
    again: Callable[[torch.Tensor], torch.Tensor] | None = None
    backward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[torch.Tensor | None]] | None] | None = (
        None
    )
    params: tuple[torch.Tensor, ...] = ()


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offloader, key, passes, hidden, *params):  # type: ignore[override]
        ctx.run, ctx.offloader, ctx.device = passes.again or run, offloader, hidden.device
        ctx.passes = passes
        ctx.saved = offloader.save(key, hidden.detach(), reused=passes.first is not None)
        with torch.no_grad():
            return run(hidden) if passes.first is None else passes.first(hidden, ctx.saved.copied)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        hidden = ctx.offloader.load(ctx.saved, ctx.device).detach()
        done = ctx.passes.backward(hidden, grad) if ctx.passes.backward is not None else None
        if done is not None:  # the params' gradients go back through autograd (DDP's hooks see them)
            hidden_grad, param_grads = done
            return None, None, None, None, hidden_grad, *param_grads
        hidden.requires_grad_(True)
        with torch.enable_grad():
            out = ctx.run(hidden)
        params = ctx.passes.params
        if params:  # their gradients go back as this function's (once: DDP marks a parameter ready once a step)
            got = torch.autograd.grad(out, [hidden, *params], grad, allow_unused=True)
            return None, None, None, None, *got
        torch.autograd.backward(out, grad)  # the layer's parameters' gradients accumulate here
        return None, None, None, None, hidden.grad


def checkpoint(
    run: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    offloader: Offloader,
    key: int,
    passes: Passes = Passes(),
) -> torch.Tensor:
    """run(hidden) with its activations recomputed in backward and hidden kept on the host in between.

    run must be deterministic (draw random seeds outside it). Parameter gradients accumulate during backward, as with
    torch's reentrant checkpoint, so use loss.backward() rather than torch.autograd.grad. passes: see Passes."""
    if not hidden.requires_grad:  # the first layer's input: without this its backward would never be called
        hidden = hidden.detach().requires_grad_(True)
    return _Checkpoint.apply(run, offloader, key, passes, hidden, *passes.params)
