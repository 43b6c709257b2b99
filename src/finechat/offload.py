"""Activation checkpointing with the checkpoints in pinned host memory.

Each decoder layer runs forward without keeping its activations; only its input is kept, copied to pinned CPU memory
on a side CUDA stream while the layer computes. Backward copies it back (the next layer's input is prefetched while
the current one recomputes), reruns the layer with autograd on, and back-propagates through it. GPU memory then holds
one layer's activations at a time instead of one hidden-state tensor per layer: at 8x1024 on Mistral-7B that is
32 x 64 MiB = 2 GiB less, at 131,072 tokens 32 GiB less. Without CUDA the inputs simply stay where they are.

A layer may also keep a part of its first pass for backward instead of recomputing it (Kept): that part's autograd
graph, built in the first pass with its saved tensors sent to pinned host memory through saved-tensor hooks, and
named values such as an intermediate hidden state. The recompute then stands in for the part with Kept.replay,
whose backward runs the kept graph, and takes the named values as they were. The fast path keeps each decoder
layer's attention this way where host memory allows (finechat.fastpath)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.graph import GradientEdge, get_gradient_edge, saved_tensors_hooks

log = logging.getLogger(__name__)

# The last layers whose checkpoints and kept tensors stay on the GPU (Offloader.resident).
RESIDENT_LAYERS = 1
# Kept tensors smaller than this stay where they are (the rotary tables every layer shares, log-sum-exps).
KEEP_ON_DEVICE_BYTES = 4 << 20
# Of the machine's physical memory, the share that kept tensors may pin in all, over the processes of the machine
# (Offloader.may_keep).
HOST_SHARE = 0.25


@dataclass
class _Item:
    """One tensor held for backward: where it stays (kept), or its pinned host copy (host, with the event of that
    copy) and, once fetched back, its device copy (fetched, ready). A layer's checkpoint is one (_Saved), and so is
    every tensor a Kept keeps."""

    kept: torch.Tensor | None = None
    host: torch.Tensor | None = None
    device: torch.device | None = None
    copied: torch.cuda.Event | None = None
    fetched: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None


@dataclass
class _Saved:
    """A layer's checkpoint: its input, held as an _Item."""

    key: int
    item: _Item

    @property
    def kept(self) -> torch.Tensor | None:
        """The input where it stayed on its device (None when it went to the host)."""
        return self.item.kept

    @property
    def copied(self) -> torch.cuda.Event | None:
        """The event of the input's copy to the host (None when it stayed on its device)."""
        return self.item.copied


class Offloader:
    """Pinned host buffers (one per layer, reused across steps) and the copy stream of one model."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled  # False keeps checkpoints on the GPU (plain checkpointing; to measure the offload)
        self._buffers: dict[int, torch.Tensor] = {}
        self._latest: dict[int, _Saved] = {}  # layer key -> its checkpoint on the host (backward prefetches it)
        self._stream: torch.cuda.Stream | None = None
        self.layers = 0  # how many layers save here (set by the fast path)
        self.resident = RESIDENT_LAYERS  # the last layers, whose checkpoints and Kept stay on the GPU
        self.keeping = False  # whether the layers keep parts of their first pass (Kept; the fast path's setting)
        self.host_budget = _host_budget()  # bytes that this process's Kept tensors may pin in all
        self._kept: dict[int, Kept] = {}  # layer key -> its latest Kept, for the prefetch in backward
        self.kept_calls = 0  # layer calls that kept a part of their first pass (for the bench's rows)
        self._told: set[int] = set()  # the sizes may_keep has logged its answer for
        self._kept_buffers: dict[tuple[int, int], torch.Tensor] = {}  # (layer key, slot) -> pinned host buffer (flat)

    def save(self, key: int, x: torch.Tensor, reused: bool = False) -> _Saved:
        """Start copying x to the host (returns at once); keep x on its device when that is not possible (a copy of
        it when reused: its buffer is written again before backward, as a CUDA graph's input is)."""
        if not (x.is_cuda and self.enabled) or self._resident(key) or (host := self._buffer(key, x)) is None:
            return _Saved(key, _Item(kept=x.clone() if reused else x))
        saved = _Saved(key, self._to_host(host, x))
        self._latest[key] = saved
        return saved

    def load(self, saved: _Saved, device: torch.device) -> torch.Tensor:
        """The saved tensor back on device (waits for its copy). Starts fetching this layer's kept tensors (unless they
        are on their way), then the previous layer's input and kept tensors, also when this layer's input stayed on
        the device (the last layer's, Offloader.resident): its backward is where the chain of prefetches begins."""
        kept = self._kept.pop(saved.key, None)
        x = self.get(saved.item)
        saved.item.fetched = None  # (the device copy is the backward's from here)
        if self._latest.get(saved.key) is saved:
            del self._latest[saved.key]
        if kept is not None:
            kept.fetch()
        previous = self._latest.get(saved.key - 1)
        if previous is not None:
            self.fetch(previous.item)
        kept = self._kept.get(saved.key - 1)
        if kept is not None:
            kept.fetch()
        return x

    def kept(self, key: int, device: torch.device) -> Kept:
        """A new Kept for layer key's first pass (the latest one of that key, which backward prefetches)."""
        on_host = self.enabled and device.type == "cuda" and not self._resident(key)
        kept = Kept(self, key, on_host)
        self._kept[key] = kept
        self.kept_calls += 1
        return kept

    def _resident(self, key: int) -> bool:
        """Whether layer key is one of the last `resident`: backward needs their tensors first, right after forward,
        when the copies to the host may still be queued, so they stay on the GPU."""
        return self.layers > 0 and key >= self.layers - self.resident

    def may_keep(self, layer_bytes: int) -> bool:
        """Whether every layer may keep layer_bytes in host memory (within host_budget); says which, once per size."""
        total = layer_bytes * max(self.layers, 1)
        fits = total <= self.host_budget
        if layer_bytes not in self._told:
            self._told.add(layer_bytes)
            gib, budget = total / 2**30, self.host_budget / 2**30
            if fits:
                log.info("keeping each layer's attention in host memory: %.1f GiB (budget %.1f GiB)", gib, budget)
            else:
                log.info("recomputing the attention: keeping it would take %.1f GiB, over %.1f GiB", gib, budget)
        return fits

    def put(self, key: int, slot: int, x: torch.Tensor) -> _Item:
        """Start copying x (one of layer key's kept tensors) to its pinned host buffer; x stays where it is when it
        is small, not dense, or no pinned memory is to be had."""
        if x.numel() * x.element_size() < KEEP_ON_DEVICE_BYTES or not _dense(x):
            return _Item(kept=x)
        buf = self._buffer((key, slot), x, self._kept_buffers)
        if buf is None:  # stop keeping: the kept tensors would pile up on the GPU instead
            log.warning("keeping the attention in host memory stopped: no pinned memory to be had")
            self.keeping = False
            return _Item(kept=x)
        return self._to_host(buf, x)  # (the copy back runs on the same stream, after it)

    def _to_host(self, host: torch.Tensor, x: torch.Tensor) -> _Item:
        """Start copying x into its pinned buffer host; x's memory is not reused before the copy has read it."""
        copied = self._copy(host, x, x.device)
        x.record_stream(self._copy_stream(x.device))
        return _Item(host=host, device=x.device, copied=copied)

    def get(self, item: _Item) -> torch.Tensor:
        """item's tensor on its device, fetched if it is not yet (the current stream waits for it)."""
        if item.kept is not None:
            return item.kept
        self.fetch(item)
        assert item.fetched is not None and item.ready is not None and item.device is not None
        torch.cuda.current_stream(item.device).wait_event(item.ready)
        return item.fetched

    def fetch(self, item: _Item) -> None:
        """Start copying item back to its device (nothing when it is there or on its way)."""
        if item.kept is not None or item.fetched is not None:
            return
        assert item.host is not None and item.device is not None
        host = item.host
        x = torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, device=item.device)
        item.fetched, item.ready = x, self._copy(x, host, item.device)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor, device: torch.device) -> torch.cuda.Event:
        """dst.copy_(src) on the copy stream, after the work queued so far on the current stream (which may still use
        dst's memory, or write src); returns the copy's event."""
        stream = self._copy_stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return done

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _buffer(self, key: Any, x: torch.Tensor, buffers: dict | None = None) -> torch.Tensor | None:
        """A pinned host tensor with x's shape (and strides, when x is dense), in the buffer kept under key in
        buffers (the checkpoints' by default), reused while it is large enough: batches of other shapes (chat data)
        do not pin memory again. None when no pinned memory is to be had."""
        buffers = self._buffers if buffers is None else buffers
        buf = buffers.get(key)
        if buf is None or buf.dtype != x.dtype or buf.numel() < x.numel():
            buffers.pop(key, None)
            try:
                buf = torch.empty(x.numel(), dtype=x.dtype, pin_memory=True)
            except RuntimeError:  # host memory exhausted or pinning refused
                return None
            buffers[key] = buf
        part = buf[: x.numel()]
        return part.as_strided(x.shape, x.stride()) if _dense(x) else part.view(x.shape)


class Kept:
    """What one checkpointed layer call keeps from its first pass so that its recompute can skip a part of it.

    First pass: record(fn, *inputs) runs fn with autograd on (inputs as stand-ins that require grad) under
    saved-tensor hooks that send what autograd saves to pinned host memory, and keeps the graph's ends; keep(name, t)
    keeps a value. Recompute: replay(*inputs) gives fn's output as it was, and its backward runs the kept graph, so
    the inputs get the gradients fn's recompute would have given them; value(name, *parts) gives the kept value as
    if it were recomputed as the sum of parts (which get its gradient). Backward prefetches the tensors (Offloader);
    release() drops them after the layer's backward. On CPU, and for the last layers (Offloader.resident), the tensors
    stay where they are."""

    def __init__(self, offloader: Offloader, key: int, on_host: bool) -> None:
        self.offloader, self.key, self.on_host = offloader, key, on_host
        self._items: list[_Item] = []
        self._slots: dict[tuple, int] = {}  # a tensor's (address, shape, strides, dtype) -> its slot in _items
        self._sources: list[torch.Tensor] = []  # the first pass's tensors, held until close() (addresses stay unique)
        self._named: dict[str, int] = {}
        self._output: int | None = None
        self._edges: tuple[GradientEdge, list[GradientEdge]] | None = None

    def record(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        """fn(*inputs), with its graph and saved tensors kept for replay's backward (first pass)."""
        anchor = torch.empty(0, device=inputs[0].device, requires_grad=True)
        with torch.enable_grad(), saved_tensors_hooks(self._pack, self.tensor):
            stand_ins = _Source.apply(anchor, *inputs)
            out = fn(*stand_ins)
        self._edges = (get_gradient_edge(out), [get_gradient_edge(t) for t in stand_ins])
        self._output = self._pack(out)
        return out.detach()

    def keep(self, name: str, value: torch.Tensor) -> None:
        """Keep value under name (first pass)."""
        self._named[name] = self._pack(value.detach())

    def close(self) -> None:
        """The first pass is over: its tensors are no longer held here (their copies are on their way)."""
        self._sources.clear()
        self._slots.clear()

    def replay(self, *inputs: torch.Tensor) -> torch.Tensor:
        """record's fn output, standing in for fn(*inputs) in the recompute (inputs' values are not read)."""
        return _Replayed.apply(self, *inputs)

    def value(self, name: str, *parts: torch.Tensor) -> torch.Tensor:
        """The value kept under name, standing in for sum(parts) in the recompute (parts' values are not read)."""
        return _Valued.apply(self, name, *parts)

    def fetch(self) -> None:
        """Start copying every kept tensor back to the device."""
        for item in self._items:
            self.offloader.fetch(item)

    def release(self) -> None:
        """Drop everything (after the layer's backward)."""
        self._items.clear()
        self._named.clear()
        self._edges = None
        self.close()

    def tensor(self, slot: int) -> torch.Tensor:
        """The kept tensor in slot, on its device (also the saved-tensor hooks' unpack)."""
        return self.offloader.get(self._items[slot])

    def named(self, name: str) -> torch.Tensor:
        return self.tensor(self._named[name])

    def has(self, name: str) -> bool:
        return name in self._named

    def output(self) -> torch.Tensor:
        assert self._output is not None, "Kept.replay before record"
        return self.tensor(self._output)

    def grads(self, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The gradients of record's inputs from its output's gradient, through the kept graph (once)."""
        assert self._edges is not None, "Kept.replay's backward ran twice, or before record"
        out, ins = self._edges
        self._edges = None
        return torch.autograd.grad([out], ins, [grad], allow_unused=True)

    def _pack(self, t: torch.Tensor) -> int:
        address = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device)
        slot = self._slots.get(address)
        if slot is None:
            slot = len(self._items)
            on_host = self.on_host and t.is_cuda
            self._items.append(self.offloader.put(self.key, slot, t) if on_host else _Item(kept=t))
            self._slots[address] = slot
            self._sources.append(t)
        return slot


class _Source(torch.autograd.Function):
    """Stand-ins for a kept graph's inputs: the same values, requiring grad through a tensor that holds nothing, so
    that the kept graph holds none of its inputs' memory (a leaf's gradient node would hold the leaf)."""

    @staticmethod
    def forward(ctx, anchor, *inputs):  # type: ignore[override]
        return tuple(t.view_as(t) for t in inputs)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        return (None, *(None for _ in grads))


class _Replayed(torch.autograd.Function):
    """A kept graph's output in the recompute; backward runs the kept graph (Kept.replay)."""

    @staticmethod
    def forward(ctx, kept, *inputs):  # type: ignore[override]
        ctx.kept = kept
        out = kept.output()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return (None, *ctx.kept.grads(grad))


class _Valued(torch.autograd.Function):
    """A kept value in the recompute, standing for the sum of the parts that get its gradient (Kept.value)."""

    @staticmethod
    def forward(ctx, kept, name, *parts):  # type: ignore[override]
        ctx.parts = len(parts)
        value = kept.named(name)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return (None, None, *(grad for _ in range(ctx.parts)))


def _dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill its memory span exactly, in some order of its dimensions (then a buffer with x's
    strides holds it with nothing around it)."""
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride(), strict=True), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _host_budget() -> int:
    """HOST_SHARE of the machine's physical memory, shared by the processes of this machine (torchrun's
    LOCAL_WORLD_SIZE: one per GPU)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 16 << 30
    processes = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return int(HOST_SHARE * memory / processes)


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
      run their accumulation hooks twice, and DDP refuses a parameter marked ready twice);
    - kept: what the first pass keeps for the recompute (Kept), released after backward."""

    first: Callable[[torch.Tensor, torch.cuda.Event | None], torch.Tensor] | None = None
    again: Callable[[torch.Tensor], torch.Tensor] | None = None
    backward: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[torch.Tensor | None]] | None] | None = (
        None
    )
    params: tuple[torch.Tensor, ...] = ()
    kept: Kept | None = None


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, offloader, key, passes, hidden, *params):  # type: ignore[override]
        ctx.run, ctx.offloader, ctx.device = passes.again or run, offloader, hidden.device
        ctx.passes = passes
        ctx.saved = offloader.save(key, hidden.detach(), reused=passes.first is not None)
        with torch.no_grad():
            out = run(hidden) if passes.first is None else passes.first(hidden, ctx.saved.copied)
        if passes.kept is not None:
            passes.kept.close()
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        try:
            return _Checkpoint._backward(ctx, grad)
        finally:
            if ctx.passes.kept is not None:
                ctx.passes.kept.release()

    @staticmethod
    def _backward(ctx, grad):
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
