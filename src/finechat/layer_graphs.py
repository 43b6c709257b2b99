"""CUDA graphs of the fast path's decoder-layer forwards, for the batches where a training step waits for the host.

With offloaded checkpointing a layer's forward runs without autograd (its activations are recomputed in backward),
so it is a fixed sequence of kernels over fixed buffers: the layer's input, the rotary tables and the layer's dropout
seeds (read by the kernels from device memory, finechat.kernels.dropout). At small batches the host needs longer to
launch those kernels than the GPU needs to run them: on an H200 at 1x2048 tokens a Mistral-7B step took 465 ms for
197 ms of GPU work, the forward alone about 170 ms of Python and launches. A graph replays the whole layer in one
launch.

How it is kept exact and small:
- a layer runs eagerly the first time it sees a shape (Triton compiles, the kernels' checks run), then is captured
  once on a side stream (after one more eager run there, as CUDA graphs require) and replayed from then on;
- inputs are copied into the graph's own buffers before each replay, and the seeds are drawn anew into its seed
  buffer, which the recompute in backward reads too, so forward and recompute agree as in eager mode;
- the layers of one shape share three hidden-state buffers in a ring (layer i reads slot i % 3 and writes slot
  (i + 1) % 3, so layer i + 1 reads its input where layer i wrote it); a slot is overwritten only after the offload
  copy that reads it is done (its event);
- every graph, of every shape, allocates in one memory pool, and nothing a graph leaves for later stays there (its
  outputs are copied into buffers outside it), so the pool holds one layer's intermediates at the largest shape, not
  one set per shape. The shapes' hidden-state buffers are views of one arena (sized to a power of two of tokens, a
  new one only for a larger shape), and the layers' parameter-gradient buffers and the rotary tables are shared
  likewise: a shape more costs little memory, so chat data, whose batches come in one shape per padded length,
  graphs its batches too;
- only batches of at most `max_tokens` tokens are graphed (the pool holds a layer's intermediates for good; above
  that the GPU is the bottleneck anyway), and graphs of at most `max_shapes` shapes are kept (`MAX_SHAPES` unless
  `finechat train --cuda-graph-shapes` says otherwise): the first shapes captured stay, and batches of other shapes
  run eagerly;
- a failed capture (an operation that cannot be captured) switches graphs off for the process with a warning, and the
  layers run eagerly as before.
With `backward_enabled` (the default; `finechat train --no-cuda-graph-backward` turns it off) each layer's recompute
and backward are captured too, as one graph from the layer's input and its output's gradient to the input's gradient
and the parameters' gradients (torch.autograd.grad inside the capture, in the same pool, at the second step's
backward, taken at stand-ins for the parameters made on the capture's stream); the parameters' gradients then reach
autograd as the checkpoint's own outputs, so they accumulate (and DDP's hooks fire) as before. On an H200 (Mistral-7B,
4x512 and 1x2048 tokens) that made the steps 1.7-1.8x faster than with an eager backward, and GPU-bound. If a backward
capture fails, the backwards run eagerly and the forward graphs stay."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from finechat.packing import Segments

log = logging.getLogger(__name__)

# shapes whose graphs are kept: packed text has one (the last partial batch a second); chat data padded to multiples
# of 64 tokens has one per multiple up to max_seq_length (finechat.train.pad_multiple), each batch size its own
MAX_SHAPES = 32
_RING = 3  # hidden-state buffers per shape
_BUFFERS = _RING + 3  # and the backward graph's input, output gradient and input gradient

LayerFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden, cos, sin) -> layer output
# (hidden, stand-ins for the parameters, in their order) -> the layer's output, computed with the stand-ins
RecomputeFn = Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]


@dataclass
class Entry:
    """One layer at one shape: its seed buffer, and once captured its graph and rotary-table buffers. key: what else
    the graph depends on (adapters, kernel switches); a call with another key starts a new entry."""

    index: int
    shape: tuple
    key: tuple
    seeds: torch.Tensor
    calls: int = 0
    graph: Any = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    backward_calls: int = 0
    backward_graph: Any = None
    grads: list[torch.Tensor] = field(default_factory=list)  # the backward graph's parameter gradients
    segments: Segments | None = None  # packed rows: the graph's boundaries buffer and length bound (forward fills it)


@dataclass
class LayerGraphs:
    """The graphs of one model's fast decoder layers (shared by them, like their Offloader)."""

    enabled: bool = True
    backward_enabled: bool = False  # the recompute and backward as a graph too (see backward)
    max_tokens: int = 4096
    max_shapes: int = MAX_SHAPES  # shapes whose graphs are kept (TrainConfig.cuda_graph_shapes)
    failed: str = ""  # why capturing failed (graphs are then off)
    failed_backward: str = ""  # why capturing a backward failed (backward graphs are then off)
    _entries: dict[tuple, Entry] = field(default_factory=dict)  # (layer index, shape) -> entry
    _views: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)  # shape -> ring slots, h, g, dh
    _arena: torch.Tensor | None = None  # the latest (largest) memory the views are made in
    _rotary: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # shape -> cos, sin
    _bounds: dict[tuple, Segments] = field(default_factory=dict)  # shape -> packed rows' boundaries buffer
    _grads: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)  # a layer's parameter-gradient buffers
    _pool: Any = None  # the memory pool of every graph
    _busy: dict[int, torch.cuda.Event] = field(default_factory=dict)  # ring slot address -> copy reading it
    _stream: torch.cuda.Stream | None = None

    def entry(
        self,
        index: int,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        mask: torch.Tensor | None,
        seeds: int,
        key: tuple,
        segments: Segments | None = None,
    ) -> Entry | None:
        """The entry of layer index for this call, or None when the call runs eagerly (CPU, an attention mask,
        too many tokens, graphs off). key names what else the graph depends on (adapters, kernel switches).
        segments (packed rows): their bucket (Segments.bucket) is part of the shape."""
        tokens = hidden.numel() // hidden.shape[-1]
        if not (self.enabled and not self.failed and self._graphable(hidden) and mask is None):
            return None
        if tokens > self.max_tokens:
            return None
        bucket = None if segments is None else segments.bucket()
        shape = (tuple(hidden.shape), hidden.dtype, hidden.device, tuple(cos.shape), cos.dtype, bucket)
        entry = self._entries.get((index, shape))
        if entry is None or entry.key != key:
            if not self._make_room(shape):
                return None
            seed_buffer = torch.zeros(seeds, dtype=torch.int64, device=hidden.device)
            entry = self._entries[(index, shape)] = Entry(index, shape, key, seed_buffer)
        return entry

    @staticmethod
    def _graphable(hidden: torch.Tensor) -> bool:
        return hidden.is_cuda

    def forward(
        self,
        entry: Entry,
        fn: LayerFn,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        reading: torch.cuda.Event | None = None,
        segments: Segments | None = None,
    ) -> torch.Tensor:
        """fn(hidden, cos, sin) without autograd, through entry's graph once it is captured. reading: the event of
        the (offload) copy that reads hidden, which must be done before hidden's buffer is written again.
        segments (packed rows): copied into the shape's boundaries buffer, entry.segments, which fn reads (in the
        graph and in the eager calls before it, so that both compute alike)."""
        entry.calls += 1
        if segments is not None:
            entry.segments = self._fill_bounds(entry.shape, segments, hidden)
        if entry.graph is None and (entry.calls < 2 or self.failed):
            return fn(hidden, cos, sin)
        h_in, h_out = self._slots(entry, hidden)
        self._wait(h_out)
        if hidden.data_ptr() != h_in.data_ptr():
            self._wait(h_in)
            h_in.copy_(hidden)
        if entry.cos is None or entry.sin is None:
            if entry.shape not in self._rotary:  # one pair per shape: every layer's step reads the same tables
                self._rotary[entry.shape] = (torch.empty_like(cos), torch.empty_like(sin))
            entry.cos, entry.sin = self._rotary[entry.shape]
        entry.cos.copy_(cos)
        entry.sin.copy_(sin)
        if entry.graph is None:
            try:
                cos_, sin_ = entry.cos, entry.sin
                entry.graph = self._record(lambda: h_out.copy_(fn(h_in, cos_, sin_)), entry.shape, hidden.device)
            except Exception as e:  # an operation that cannot be captured: eager from now on
                self.failed = _given_up(e, "forwards failed (%s); the layers run eagerly")
                self.clear()
                torch.cuda.synchronize(hidden.device)
                return fn(hidden, cos, sin)
        entry.graph.replay()
        if reading is not None and hidden.data_ptr() == h_in.data_ptr():
            self._busy[h_in.data_ptr()] = reading
        return h_out.detach()  # a new tensor over the slot: autograd's bookkeeping stays off the ring's tensors

    def backward(
        self,
        entry: Entry,
        fn: RecomputeFn,
        params: tuple[torch.Tensor, ...],
        hidden: torch.Tensor,
        grad: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]] | None:
        """The recompute fn(hidden, stand-ins of params) and its backward from grad, through entry's backward graph
        once it is captured:
        hidden's gradient and params' gradients (copies: the graph's buffers are written again at the next replay),
        or None when this call runs eagerly (backward graphs off, the first call at a shape, a failed capture).
        Every tensor fn reads besides its argument must outlive the graph (the graph keeps addresses, not tensors):
        parameters, entry's seeds and its forward graph's rotary buffers."""
        if not self.backward_enabled or self.failed_backward or grad.dtype != hidden.dtype:
            return None  # (the output gradient's buffer has the hidden state's dtype)
        entry.backward_calls += 1
        if entry.backward_graph is None and entry.backward_calls < 2:
            return None
        h, g, dh = self._buffers(entry.shape, hidden)[_RING:]
        with torch.no_grad():
            h.copy_(hidden)
            g.copy_(grad)
        if entry.backward_graph is None:
            try:
                self._capture_backward(entry, fn, params)
            except Exception as e:  # an operation that cannot be captured: eager from now on
                self.failed_backward = _given_up(e, "backwards failed (%s); they run eagerly")
                for other in self._entries.values():
                    other.backward_graph, other.grads = None, []
                return None
        entry.backward_graph.replay()
        return dh.clone(), [buffer.clone() for buffer in entry.grads]

    def clear(self) -> None:
        """Drop every graph (their memory returns to the allocator's cache)."""
        self._entries.clear()
        self._views.clear()
        self._arena = None
        self._rotary.clear()
        self._bounds.clear()
        self._grads.clear()
        self._pool = None
        self._busy.clear()

    def captured(self) -> int:
        """How many layer forward graphs are captured (for tests and the bench)."""
        return sum(entry.graph is not None for entry in self._entries.values())

    def captured_backward(self) -> int:
        """How many layer backward graphs are captured."""
        return sum(entry.backward_graph is not None for entry in self._entries.values())

    def _fill_bounds(self, shape: tuple, segments: Segments, hidden: torch.Tensor) -> Segments:
        """shape's boundaries buffer (one per shape, shared by its layers, like the rotary tables) holding segments'
        boundaries, padded with empty segments at the row's end to the bucket's capacity; its length bound is the
        bucket's. The flash kernel's grid is sized by these, and skips the empty segments' blocks."""
        capacity, bound = shape[-1]
        kept = self._bounds.get(shape)
        if kept is None:
            cu = torch.empty(capacity + 1, dtype=torch.int32, device=hidden.device)
            kept = self._bounds[shape] = Segments(cu=cu, longest=bound)
        n = segments.cu.numel()
        kept.cu[:n].copy_(segments.cu)
        kept.cu[n:].fill_(hidden.numel() // hidden.shape[-1])
        return kept

    def _slots(self, entry: Entry, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ring buffers entry's layer reads and writes."""
        ring = self._buffers(entry.shape, hidden)
        return ring[entry.index % _RING], ring[(entry.index + 1) % _RING]

    def _buffers(self, shape: tuple, like: torch.Tensor) -> list[torch.Tensor]:
        """shape's hidden-state buffers, like `like`: the ring's slots, then the backward graph's input (a leaf that
        requires grad), output gradient and input gradient. Every shape's buffers are views of one arena, buffer i
        of every shape at the start of the arena's region i: at most one step runs at a time, and a slot's pending
        offload copy is waited for by the slot's address, which the same slot of every shape shares. A shape larger
        than the arena's regions gets a new arena (regions of the next power of two tokens); the shapes made in the
        old one keep it."""
        views = self._views.get(shape)
        if views is None:
            n, width, arena = like.numel(), like.shape[-1], self._arena
            if (
                arena is None
                or arena.numel() < _BUFFERS * n
                or (arena.dtype, arena.device) != (like.dtype, like.device)
            ):
                tokens = 1 << (n // width - 1).bit_length()
                arena = self._arena = torch.empty(_BUFFERS * tokens * width, dtype=like.dtype, device=like.device)
            region = arena.numel() // _BUFFERS
            views = [arena[i * region : i * region + n].view(like.shape) for i in range(_BUFFERS)]
            views[_RING].requires_grad_(True)
            self._views[shape] = views
        return views

    def _wait(self, slot: torch.Tensor) -> None:
        """The current stream waits until the copy reading slot (if any) is done."""
        event = self._busy.pop(slot.data_ptr(), None)
        if event is not None:
            torch.cuda.current_stream(slot.device).wait_event(event)

    def _make_room(self, shape: tuple) -> bool:
        """Whether shape may have entries: the shapes kept are at most max_shapes. A shape with no graph captured
        yet makes way for a new one (the oldest first); a captured one stays, and a batch of yet another shape then
        runs eagerly. (Batches of ever-changing shapes, chat records padded to their lengths, would otherwise
        capture graphs and drop them again without end.)"""
        shapes = list(dict.fromkeys(s for _, s in self._entries))
        if shape in shapes or len(shapes) < self.max_shapes:
            return True
        captured = {s for (_, s), e in self._entries.items() if e.graph is not None or e.backward_graph is not None}
        loose = [s for s in shapes if s not in captured]
        if not loose:
            return False
        oldest = loose[0]
        self._entries = {k: e for k, e in self._entries.items() if k[1] != oldest}
        self._views.pop(oldest, None)  # (its slots' pending copies stay waited for: other shapes share the addresses)
        self._rotary.pop(oldest, None)
        self._bounds.pop(oldest, None)
        return True

    def _capture_backward(self, entry: Entry, fn: RecomputeFn, params: tuple[torch.Tensor, ...]) -> None:
        h, g, dh = self._views[entry.shape][_RING:]
        # outside the pool: they outlive the graph's run; one set per layer, whatever the shape (each replay's are
        # copied out at once)
        key = (entry.index, *((p.shape, p.dtype, p.device) for p in params))
        grads = self._grads.get(key)
        if grads is None:
            grads = self._grads[key] = [torch.empty_like(p) for p in params]

        def work() -> None:
            # The parameters' gradients are taken at stand-ins: new leaves over the same memory, made here on the
            # capture's stream. A parameter's own gradient accumulator belongs to the stream of the forward that
            # first used it (the default stream), and autograd makes that stream wait for gradients produced on
            # another one, which a capture refuses ("operation would make the legacy stream depend on a capturing
            # blocking stream", seen on an H200).
            leaves = [p.detach().requires_grad_(True) for p in params]
            with torch.enable_grad():
                out = fn(h, leaves)
            got = torch.autograd.grad(out, [h, *leaves], g, allow_unused=True)
            with torch.no_grad():
                for buffer, value in zip([dh, *grads], got, strict=True):
                    if value is None:  # a parameter this layer's output does not depend on
                        buffer.zero_()
                    else:
                        buffer.copy_(value)

        entry.backward_graph = self._record(work, entry.shape, h.device)
        entry.grads = grads

    def _record(self, work: Callable[[], Any], shape: tuple, device: torch.device) -> Any:
        """work() captured as a CUDA graph on the side stream, in the graphs' memory pool, after one run there (its
        cuBLAS workspace, lazy state); returns the graph (its replay() runs work on the current stream). work must
        leave nothing in the pool that a later graph could overwrite: what it keeps, it copies out."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        pool = self._pool
        current = torch.cuda.current_stream(device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        side = self._stream
        side.wait_stream(current)
        with torch.cuda.stream(side):
            work()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: other threads (autograd's, NCCL's watchdog under DDP) may use CUDA meanwhile
            with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
                work()
        except Exception:
            _end_generator_capture(side)
            raise
        return graph


def _end_generator_capture(stream: torch.cuda.Stream) -> None:
    """After a failed capture, torch's CUDA generator still counts itself as capturing (the capture's end raised
    before the generator's epilogue ran), and every later random draw outside a graph raises "Offset increment
    outside graph capture encountered unexpectedly" (seen on an H200: one failed backward capture stopped the whole
    run). A capture that succeeds runs the generator's prologue and epilogue and leaves it as before."""
    scratch = torch.zeros(1, device=stream.device)
    with torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream):
        scratch.add_(1)


def _given_up(e: BaseException, what: str) -> str:
    """Why a capture failed, in one line (returned), warned as "CUDA graphs of the layer " + what % it, with the
    first error's traceback in the debug log."""
    why = _why(e)
    log.warning("CUDA graphs of the layer " + what, why)
    log.debug("where the capture failed first", exc_info=_first(e))
    return why


def _why(e: BaseException) -> str:
    """An exception in one line, for a warning and the bench's rows. A capture that fails reports "operation failed
    due to a previous error during capture" when it ends; the operation that failed raised first, and is named too."""
    first = _first(e)
    return _line(e) if first is e else f"{_line(first)} (then {_line(e)})"


def _first(e: BaseException) -> BaseException:
    """The exception that started e's chain (the one raised while e's handling began), or e."""
    while e.__context__ is not None and not e.__suppress_context__:
        e = e.__context__
    return e


def _line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
