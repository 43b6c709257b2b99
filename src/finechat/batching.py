"""Continuous batching: one thread steps every running generation together through the decoder. A request joins
between two steps (after its own prefill) and leaves as soon as it is finished, cancelled or no longer read, so a
new reply never waits for a long one to end.

The next step is launched on the GPU before the tokens of the last one are handed to their readers: waking 16
reader threads made the decode thread wait for the GIL before it could launch again, and a batched step took 2.5-3.4
ms more wall time than its CUDA graph on an H200 (docs/benchmarks.md, decode round 7)."""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from finechat.decode import Decoder

log = logging.getLogger(__name__)

END = object()  # queued after a request's last token
# Requests that arrive together are prefilled in one forward, up to this many (padded) prompt tokens at once.
PREFILL_TOKENS = 8192


@dataclass(eq=False)
class Request:
    """One generation in the batcher; its tokens arrive in `out` (ints, then END; None once cancelled)."""

    prompt_ids: list[int]
    max_tokens: int
    pick: Callable[[Any], Any] | None  # sampler: scores [1, vocab] -> token tensor; None is greedy
    cancel: threading.Event
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    gone: bool = False  # the reader has stopped reading
    done: bool = False
    produced: int = 0
    position: int = 0  # where the next fed token goes in the cache
    last: int = 0  # the token to feed next


class Batcher:
    """Runs requests on a Decoder: FIFO admission into its slots, one batched step at a time under `lock`."""

    def __init__(self, decoder: Decoder, eos_ids: Iterable[int], lock: threading.Lock):
        self.decoder, self.eos_ids, self.lock = decoder, set(eos_ids), lock
        self.pending: deque[Request] = deque()
        self.active: list[Request] = []  # active[i] lives in cache slot i
        self.wake = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.inflight: tuple[list[Request], Any] | None = None  # a launched step: its rows, its logits (not yet read)
        self.steps = 0
        self.rows = 0  # sum of batch sizes over steps
        self.largest = 0
        # Seconds of the decode thread's loop while it has work: prefill (joining requests), step (the batched
        # step with its sync and token picks) and emit (handing tokens to readers); the loop's own total beside them
        # shows the rest (waits for the GIL and the lock, dropping finished requests). finechat bench generate
        # reports them per step for concurrent streams.
        self.seconds = {"loop": 0.0, "prefill": 0.0, "step": 0.0, "emit": 0.0}

    def fits(self, positions: int) -> bool:
        """True when a prompt plus reply of this many tokens fits a slot."""
        return positions <= self.decoder.capacity

    def submit(self, request: Request) -> None:
        """Queue a request; its tokens start arriving in request.out."""
        with self.wake:
            if self.stopping:
                raise RuntimeError("the engine is closed")
            self.pending.append(request)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="finechat-decode", daemon=True)
                self.thread.start()
                # Join the thread before the interpreter tears torch down: a decode thread still parked at exit
                # aborted the process ("terminate called without an active exception", exit 134).
                atexit.register(self.close)
            self.wake.notify()

    def leave(self, request: Request) -> None:
        """The reader is done with a request: free its place (at the next step when it is decoding)."""
        request.gone = True
        with self.wake:
            if request in self.pending:
                self.pending.remove(request)

    def close(self) -> None:
        """Stop the decoding thread (requests still running get an error)."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _run(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self.wake:
                    while not self.pending and not self.active and not self.stopping:
                        self.wake.wait()
                    if self.stopping:
                        break
                    joining: list[Request] = []
                    while self.pending and len(self.active) + len(joining) < self.decoder.slots:
                        joining.append(self.pending.popleft())
                start = time.perf_counter()
                try:
                    for group in self._prefill_groups(joining):  # new slots only: a launched step keeps its own
                        self._join(group)
                    if self.inflight is None:
                        self._drop_finished()
                        if self.active:
                            self._launch()
                    if self.inflight is not None:
                        self._step()
                    self.seconds["loop"] += time.perf_counter() - start
                except Exception as e:  # a failed step fails the generations in it, not the thread
                    log.exception("decoding step failed")
                    for request in [*joining, *self.active]:
                        request.out.put(e)
                    self.active, self.inflight = [], None
        for request in [*self.pending, *self.active]:
            request.out.put(RuntimeError("the engine was closed during generation"))

    def _prefill_groups(self, joining: list[Request]) -> list[list[Request]]:
        """The joining requests still wanted, in groups of at most PREFILL_TOKENS padded tokens (one forward each)."""
        groups: list[list[Request]] = []
        for request in joining:
            if request.gone or request.cancel.is_set():
                request.out.put(None)
                continue
            group = groups[-1] if groups else None
            width = max([len(request.prompt_ids), *(len(r.prompt_ids) for r in group or [])])
            if group is None or width * (len(group) + 1) > PREFILL_TOKENS:
                groups.append([request])
            else:
                group.append(request)
        return groups

    def _join(self, requests: list[Request]) -> None:
        """Prefill requests together into the next free slots; each gets its first token and starts decoding."""
        slots = list(range(len(self.active), len(self.active) + len(requests)))
        start = time.perf_counter()
        with self.lock:
            logits = self.decoder.prefill_many(slots, [r.prompt_ids for r in requests])
            tokens = self._pick(requests, logits)
        self.seconds["prefill"] += time.perf_counter() - start
        for request, token in zip(requests, tokens, strict=True):
            request.position = len(request.prompt_ids)
            self._emit(request, token)
            self.active.append(request)

    def _launch(self) -> None:
        """Queue a step of every active request on the GPU (its logits are read by _step)."""
        start = time.perf_counter()
        requests = list(self.active)
        with self.lock:
            self.inflight = requests, self.decoder.step([r.last for r in requests], [r.position for r in requests])
        self.seconds["step"] += time.perf_counter() - start

    def _step(self) -> None:
        """Read the launched step's tokens, launch the next step (unless requests wait to join first), then hand the
        tokens to their readers while the GPU runs."""
        assert self.inflight is not None
        requests, logits = self.inflight
        start = time.perf_counter()
        with self.lock:
            tokens = self._pick(requests, logits)
        self.inflight = None
        self.steps += 1
        self.rows += len(requests)
        self.largest = max(self.largest, len(requests))
        for request, token in zip(requests, tokens, strict=True):
            request.position += 1
            self._record(request, token)
        self._drop_finished()
        self.seconds["step"] += time.perf_counter() - start
        try:
            if self.active and not (self.pending and len(self.active) < self.decoder.slots):
                self._launch()
        finally:  # a launch that fails still hands out these tokens (finished requests are no longer active)
            start = time.perf_counter()
            for request, token in zip(requests, tokens, strict=True):
                self._deliver(request, token)
            self.seconds["emit"] += time.perf_counter() - start

    def _emit(self, request: Request, token: int) -> None:
        self._record(request, token)
        self._deliver(request, token)

    def _record(self, request: Request, token: int) -> None:
        """Count a request's new token and make it the next one fed; done at EOS or its limit."""
        request.produced += 1
        request.last = token
        if token in self.eos_ids or request.produced >= request.max_tokens:
            request.done = True

    def _deliver(self, request: Request, token: int) -> None:
        """Hand a token to the request's reader (then END when the request is done)."""
        request.out.put(token)
        if request.done:
            request.out.put(END)

    def _drop_finished(self) -> None:
        """Remove finished, cancelled and abandoned requests; the rest move down to slots 0..n-1, in order."""
        kept: list[Request] = []
        for slot, request in enumerate(self.active):
            if request.cancel.is_set() and not request.done:
                request.out.put(None)
            elif not (request.done or request.gone):
                if slot != len(kept):
                    self.decoder.move(slot, len(kept), request.position)
                kept.append(request)
        self.active = kept

    def _pick(self, requests: list[Request], logits: Any) -> list[int]:
        """Next token of each row: argmax (as generate's greedy search takes it), or the request's sampler."""
        scores = logits.float()
        tokens = scores.argmax(-1)
        for i, request in enumerate(requests):
            if request.pick is not None:
                tokens[i] = request.pick(scores[i : i + 1])
        return tokens.cpu().tolist()  # the copy waits for the GPU without holding the GIL
