"""Ctrl-C (and SIGTERM) handling: the second one stops at once, except the copy a launcher passes on right after
the first."""

import pytest

from finechat import callbacks


def test_second_ctrl_c_stops_at_once_in_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cb = callbacks.InterruptCallback()
    cb._on_signal(2, None)
    assert cb.interrupted
    with pytest.raises(KeyboardInterrupt):
        cb._on_signal(2, None)


def test_under_a_launcher_the_passed_on_copy_is_the_same_ctrl_c(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    clock = iter([100.0, 100.3, 100.0 + callbacks.LAUNCHER_REPEAT_S + 0.1])
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    cb = callbacks.InterruptCallback()
    cb._on_signal(2, None)  # the terminal's
    cb._on_signal(2, None)  # torchrun's copy of it: still finishing the step
    assert cb.interrupted
    with pytest.raises(KeyboardInterrupt):  # a real second Ctrl-C
        cb._on_signal(2, None)


def test_sigterm_stops_like_ctrl_c_while_armed():
    import signal

    cb = callbacks.InterruptCallback()
    before = signal.getsignal(signal.SIGTERM)
    with cb.armed():
        assert signal.getsignal(signal.SIGTERM) == cb._on_signal == signal.getsignal(signal.SIGINT)
        cb._on_signal(signal.SIGTERM, None)
    assert cb.interrupted and signal.getsignal(signal.SIGTERM) == before


def test_a_ctrl_c_while_the_processes_compare_flags_stops_the_next_step(monkeypatch):
    """Under a launcher, a signal that arrives while the step-end collective runs is handled when it returns, after
    the flag was read: the processes' answer (no one stops) must not erase it."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    monkeypatch.setenv("WORLD_SIZE", "2")
    cb = callbacks.InterruptCallback()
    asked = []

    def any_process(flag: bool) -> bool:
        if not asked:
            cb._on_signal(2, None)  # the Ctrl-C, handled as the collective returns
        asked.append(flag)
        return flag  # the other process has no Ctrl-C of its own

    monkeypatch.setattr(callbacks.distributed, "any_process", any_process)
    control, args = TrainerControl(), SimpleNamespace(world_size=2)
    cb.on_step_end(args, None, control)
    assert not control.should_training_stop  # the others had not heard of it at this step's check
    cb.on_step_end(args, None, control)
    assert asked == [False, True] and control.should_training_stop and control.should_save and cb.interrupted


def test_logged_tokens_per_second_leave_evaluations_out(tmp_path, monkeypatch):
    """An evaluation between two training logs (its eval_runtime) does not count as training time."""
    from types import SimpleNamespace

    clock = iter([0.0, 10.0, 25.0, 30.0])  # train begins, training log, evaluation log, training log
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    progress = callbacks.ProgressAndMetrics(tmp_path, keep=1)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0, is_world_process_zero=False, max_steps=4)
    progress.on_train_begin(None, state, None)
    state.global_step, state.num_input_tokens_seen = 2, 1000
    progress.on_log(None, state, None, logs={"loss": 2.0})
    progress.on_log(None, state, None, logs={"eval_loss": 1.9, "eval_runtime": 15.0})
    state.global_step, state.num_input_tokens_seen = 4, 1500
    progress.on_log(None, state, None, logs={"loss": 1.8})
    assert progress.rates == [100.0, 100.0]  # 1000 tokens in 10 s; 500 in 20 s less 15 s of evaluation
