"""Trainer callbacks: progress bar and metrics, atomic checkpoint publishing, Ctrl-C handling."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from finechat import distributed, runs

log = logging.getLogger(__name__)


class ProgressAndMetrics(TrainerCallback):
    """A progress bar with loss, tokens/s and ETA; metrics.jsonl lines; checkpoints published atomically."""

    def __init__(self, run_dir: Path, keep: int):
        self.run_dir, self.keep = run_dir, keep
        self.bar = None
        self.last_time = self.last_tokens = 0.0
        self.evaluating = 0.0  # seconds of evaluation since the last training log (not training time)
        self.rates: list[float] = []

    def on_train_begin(self, args, state, control, **kw):
        import torch
        from tqdm.auto import tqdm

        if state.is_world_process_zero:  # one bar for the run, not one per process
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="train", unit="step", dynamic_ncols=True
            )
        self.last_time, self.last_tokens = time.perf_counter(), state.num_input_tokens_seen
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # peak_gib covers training, not loading

    def on_step_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        now = time.perf_counter()
        row: dict = {"step": state.global_step}
        if "loss" in logs:
            # Evaluations run between training logs; their time is left out, so the rate is the training's own.
            seconds = now - self.last_time - self.evaluating
            rate = (state.num_input_tokens_seen - self.last_tokens) / max(seconds, 1e-9)
            self.last_time, self.last_tokens, self.evaluating = now, state.num_input_tokens_seen, 0.0
            self.rates.append(rate)
            row.update(
                loss=logs["loss"],
                lr=logs.get("learning_rate"),
                tokens_per_s=round(rate, 1),
                tokens_seen=state.num_input_tokens_seen,
                epoch=logs.get("epoch"),
            )
            row.update(_peak_memory())
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}", tok_s=f"{rate:.0f}")
        if "eval_loss" in logs:
            self.evaluating += logs.get("eval_runtime", 0.0)
            row.update(eval_loss=logs["eval_loss"], eval_perplexity=math.exp(min(logs["eval_loss"], 50)))
        if len(row) > 1 and state.is_world_process_zero:
            runs.append_metrics(self.run_dir, row)

    def on_save(self, args, state, control, **kw):
        distributed.barrier(_plan(args))  # every process has written its part (its RNG state, FSDP shards)
        if state.is_world_process_zero:
            staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if staged.is_dir():
                runs.publish_checkpoint(self.run_dir, staged, self.keep)

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()

    def mean_tokens_per_s(self) -> float:
        """Mean training throughput over logged intervals (the first, which includes warm-up, is skipped)."""
        rates = self.rates[1:] or self.rates
        return sum(rates) / len(rates) if rates else 0.0


class FSDPAdapter(TrainerCallback):
    """Under FSDP, writes the adapter weights into every checkpoint and reads them back on --resume.

    peft 0.21 finds the adapter's weights by module name and strips only the outer FSDP wrapper's prefix, so in a
    model whose decoder layers and LoRA layers are FSDP units too it finds none: the Trainer's checkpoints (and
    accelerate's FSDP model file) hold an empty adapter, and a resumed run restarts from the LoRA initialisation.
    Measured on the CPU/gloo simulation of this path (tests/test_distributed.py). The adapter is written in the
    dtypes of a single-process run (see distributed.ADAPTER_TRAINING_WEIGHTS)."""

    def __init__(self, model, run_dir: Path):
        self.layout = distributed.adapter_layout(model)  # before FSDP flattens (and accelerate upcasts) them
        self.run_dir = run_dir

    def on_train_begin(self, args, state, control, model=None, **kw):
        if state.global_step > 0:  # resumed: the Trainer has loaded everything but the adapter
            checkpoint = self.run_dir / runs.CHECKPOINTS / f"checkpoint-{state.global_step}"
            distributed.load_adapter_weights(model, checkpoint, self.layout)

    def on_save(self, args, state, control, model=None, **kw):
        state_dict = distributed.gather_full_state_dict(model)
        if state.is_world_process_zero:
            staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            distributed.save_checkpoint_adapter(staged, state_dict, self.layout)


def _plan(args) -> distributed.Plan:
    return distributed.Plan(world_size=args.world_size, rank=args.process_index)


def _peak_memory() -> dict:
    """Peak GPU memory of this process since training began ({} on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


# Under torchrun a terminal's Ctrl-C may reach each process twice: from the terminal, where the workers share the
# foreground process group, and again from torchrun, which passes the signal on. (torch 2.13's torchrun starts each
# worker in a session of its own, so there it arrives once.) A repeat this soon is the same Ctrl-C.
LAUNCHER_REPEAT_S = 2.0
# Ctrl-C, and the SIGTERM a job scheduler (or `kill`) sends before it kills a job: both stop the run with a checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptCallback(TrainerCallback):
    """First Ctrl-C (or SIGTERM): finish the current step, save a checkpoint and stop. A second one stops at once
    (under a launcher, a second one at least LAUNCHER_REPEAT_S later: the launcher passes the first one on)."""

    def __init__(self):
        self.interrupted = False
        self._previous: dict = {}
        self._first_at = 0.0

    def armed(self):
        @contextlib.contextmanager
        def scope():
            self._previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
            try:
                yield
            finally:
                for sig, previous in self._previous.items():
                    signal.signal(sig, previous)

        return scope()

    def _on_signal(self, signum, frame):
        if self.interrupted:
            if distributed.world_size() > 1 and time.monotonic() - self._first_at < LAUNCHER_REPEAT_S:
                return
            raise KeyboardInterrupt
        self.interrupted, self._first_at = True, time.monotonic()
        name = "interrupted" if signum == signal.SIGINT else f"{signal.Signals(signum).name} received"
        log.warning("%s: finishing this step and saving a checkpoint (Ctrl-C again to stop now)", name)

    def on_step_end(self, args, state, control, **kw):
        stop = self.interrupted
        if args.world_size > 1:  # each process got the signal at its own moment: all stop after the same step
            # A signal that comes during the collective is handled when it returns, after the flag was read: storing
            # the answer in the flag erased that Ctrl-C, and when every process was waiting in the collective the run
            # went on to its last step (5 of ~120 Ctrl-C'd 2-process CPU runs). Kept, it stops the next step.
            stop = distributed.any_process(stop)
        if stop:
            self.interrupted = True
            control.should_save = True
            control.should_training_stop = True
