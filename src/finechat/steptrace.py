"""Where a training step's time goes, for benchmarks: every process's wall time per step, and a torch.profiler
summary of one step.

Off unless FINECHAT_STEP_TRACE names a folder. Then `finechat train` (every process of a multi-GPU run) writes there,
outside the run folder:
- step-times-rank<R>.json: per optimizer step, `s` (step begin to end: forward, backward, gradient all-reduce,
  optimizer; the GPU drained at both ends) and `period` (step end to step end, adding the Trainer's logging and the
  next batch), and what can stall a step without showing in a kernel profile: `gc_s` (Python garbage-collection
  pauses) and, on CUDA, `device_allocs`/`device_frees`/`alloc_retries` (the caching allocator's cudaMalloc and
  cudaFree calls, which synchronize, and its retries after a failed allocation);
- per step also `host_s` (step begin until the host had queued it all, host-side waits included) and `drain_s` (the
  wait for the GPU after that): a stalled step's time shows on one side or the other. A step that runs past
  STALL_FACTOR times the median step so far (and at least STALL_MIN_S) gets `stacks`: the main thread's Python stack,
  taken by a watchdog thread at that moment and then every STALL_EVERY_S while the step lasts (up to STALL_STACKS);
- with FINECHAT_PROFILE_STEP=N, profile-rank<R>.json and profile-rank<R>.txt: kernels of step N by GPU time (NCCL
  ones among them), GPU time by kind (matmul, NCCL, copies, other) against the step's wall time, and the host's
  waits for the device. The profiled step runs slower; leave it out of timings.
The waits for the GPU at each step's ends cost little where the Trainer already waits every step (logging_steps=1)."""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

TRACE_ENV = "FINECHAT_STEP_TRACE"
PROFILE_STEP_ENV = "FINECHAT_PROFILE_STEP"
TOP_KERNELS = 15
STALL_FACTOR = 3.0  # a step this many times the median so far is a stall: its stacks are recorded
STALL_MIN_S = 1.0  # and at least this long
STALL_EVERY_S = 0.5  # between two stacks of one stall
STALL_STACKS = 4  # stacks per stall at most
STACK_FRAMES = 30  # innermost frames kept per stack


def from_environment(rank: int) -> StepTrace | None:
    """The callback the environment asks for (None when FINECHAT_STEP_TRACE is unset)."""
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return None
    return StepTrace(Path(folder), rank, int(os.environ.get(PROFILE_STEP_ENV, "0") or 0))


class StepTrace(TrainerCallback):
    """Records this process's step times and profiles one step (see the module docstring)."""

    def __init__(self, folder: Path, rank: int, profile_step: int = 0) -> None:
        self.folder, self.rank, self.profile_step = folder, rank, profile_step
        self.steps: list[dict[str, float]] = []
        self._begin = self._last_end = 0.0
        self._profiler: Any = None
        self._gc_s = 0.0  # garbage-collection pauses so far
        self._gc_start = 0.0
        self._counters: dict[str, int] = {}
        self._watch: tuple[threading.Thread, threading.Event] | None = None
        self._stacks: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kw):
        self.folder.mkdir(parents=True, exist_ok=True)
        gc.callbacks.append(self._gc_pause)
        self._last_end = _now()

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step + 1 == self.profile_step:
            self._profiler = _start_profiler()
        self._begin = _now()
        self._gc_at_begin, self._counters = self._gc_s, _allocator_counters()
        self._watch_for_a_stall()

    def on_step_end(self, args, state, control, **kw):
        queued = time.perf_counter()
        end = _now()
        self._stop_watching()
        step: dict[str, Any] = {"step": state.global_step, "s": end - self._begin, "period": end - self._last_end}
        step.update(host_s=queued - self._begin, drain_s=end - queued)
        if self._stacks:
            step["stacks"], self._stacks = self._stacks, []
        step["gc_s"] = self._gc_s - self._gc_at_begin
        after = _allocator_counters()
        step.update({name: after[name] - self._counters.get(name, 0) for name in after})
        self.steps.append(step)
        self._last_end = end
        if self._profiler is not None:
            self._profiler.stop()
            self._write_profile(state.global_step, end - self._begin)
            self._profiler = None

    def on_train_end(self, args, state, control, **kw):
        if self._gc_pause in gc.callbacks:
            gc.callbacks.remove(self._gc_pause)
        path = self.folder / f"step-times-rank{self.rank}.json"
        path.write_text(json.dumps({"rank": self.rank, "steps": self.steps}) + "\n")

    def _watch_for_a_stall(self) -> None:
        """Start a watchdog thread that records the main thread's stack if this step becomes a stall."""
        times = [s["s"] for s in self.steps]
        if len(times) < 3:  # no median to hold it against yet
            return
        limit = max(STALL_MIN_S, STALL_FACTOR * statistics.median(times))
        done, main, begin = threading.Event(), threading.get_ident(), self._begin

        def watch() -> None:
            wait = limit
            while len(self._stacks) < STALL_STACKS and not done.wait(wait):
                frame = sys._current_frames().get(main)
                if frame is None:
                    return
                lines = [line.rstrip() for line in traceback.format_stack(frame)[-STACK_FRAMES:]]
                self._stacks.append({"at_s": round(time.perf_counter() - begin, 3), "stack": lines})
                wait = STALL_EVERY_S

        thread = threading.Thread(target=watch, name="finechat-stall-watch", daemon=True)
        thread.start()
        self._watch = (thread, done)

    def _stop_watching(self) -> None:
        if self._watch is not None:
            thread, done = self._watch
            done.set()
            thread.join()
            self._watch = None

    def _gc_pause(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start:
            self._gc_s += time.perf_counter() - self._gc_start

    def _write_profile(self, step: int, wall_s: float) -> None:
        events = self._profiler.key_averages()
        summary = summarize_profile(events, wall_s)
        summary.update(rank=self.rank, step=step)
        (self.folder / f"profile-rank{self.rank}.json").write_text(json.dumps(summary, indent=1) + "\n")
        sort = "self_device_time_total" if summary["gpu"] else "self_cpu_time_total"
        (self.folder / f"profile-rank{self.rank}.txt").write_text(events.table(sort_by=sort, row_limit=40) + "\n")


def summarize_profile(events: Any, wall_s: float) -> dict[str, Any]:
    """A profiled step in numbers: top kernels by GPU time, GPU time by kind, host waits for the device."""
    kernels = [e for e in events if _is_kernel(e)]
    kernels.sort(key=_device_us, reverse=True)
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[kernel_kind(e.key)] = by_kind.get(kernel_kind(e.key), 0.0) + _device_us(e) / 1e3
    waits = [e for e in events if "Synchronize" in e.key and e.key.startswith("cuda")]
    host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "gpu": bool(kernels),
        "wall_ms": round(wall_s * 1e3, 2),
        "gpu_ms": round(sum(by_kind.values()), 2),  # summed over streams: may exceed wall_ms when they overlap
        "gpu_ms_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "kernels": sum(e.count for e in kernels),
        "top_kernels": [
            {"name": e.key[:160], "count": e.count, "ms": round(_device_us(e) / 1e3, 3)} for e in kernels[:TOP_KERNELS]
        ],
        "host_waits": {e.key: {"count": e.count, "ms": round(e.self_cpu_time_total / 1e3, 2)} for e in waits},
        "top_host_ops": [
            {"name": e.key[:160], "count": e.count, "ms": round(e.self_cpu_time_total / 1e3, 3)} for e in host
        ],
    }


def kernel_kind(name: str) -> str:
    """nccl, matmul, copy or other, from a kernel's name."""
    lowered = name.lower()
    if "nccl" in lowered:
        return "nccl"
    if any(tag in lowered for tag in ("gemm", "cutlass", "cublas", "nvjet", "xmma", "matmul")):
        return "matmul"
    if "memcpy" in lowered or "memset" in lowered:
        return "copy"
    return "other"


def _is_kernel(event: Any) -> bool:
    """A GPU kernel (or copy) rather than a host operation, whose own GPU time counts its kernels again."""
    from torch.autograd import DeviceType

    kind = getattr(event, "device_type", None)
    if kind is not None:
        return kind == DeviceType.CUDA and _device_us(event) > 0
    return _device_us(event) > 0 and event.self_cpu_time_total == 0


def _device_us(event: Any) -> float:
    """Self GPU time of a profiler average in microseconds (the attribute was renamed in torch 2.4)."""
    value = getattr(event, "self_device_time_total", None)
    return float(value if value is not None else getattr(event, "self_cuda_time_total", 0.0))


ALLOCATOR_COUNTERS = {"device_allocs": "num_device_alloc", "device_frees": "num_device_free",
                      "alloc_retries": "num_alloc_retries"}  # fmt: skip


def _allocator_counters() -> dict[str, int]:
    """The CUDA caching allocator's running counts of cudaMalloc, cudaFree and retries (empty without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {name: int(stats.get(key, 0)) for name, key in ALLOCATOR_COUNTERS.items()}


def _now() -> float:
    """perf_counter once the GPU has finished what was queued."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _start_profiler() -> Any:
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    profiler = profile(activities=activities, record_shapes=False, with_stack=False)
    profiler.start()
    return profiler
