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
