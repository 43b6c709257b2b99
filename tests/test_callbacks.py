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
