"""Step times and the profile summary the multi-GPU benchmark reads (finechat.steptrace), on CPU."""

import gc
import json
import time
from types import SimpleNamespace

import torch

from finechat import steptrace


def test_records_every_step_and_profiles_the_asked_one(tmp_path, monkeypatch):
    monkeypatch.setenv(steptrace.TRACE_ENV, str(tmp_path / "trace"))
    monkeypatch.setenv(steptrace.PROFILE_STEP_ENV, "2")
    trace = steptrace.from_environment(rank=1)
    assert trace is not None
    state = SimpleNamespace(global_step=0)
    trace.on_train_begin(None, state, None)
    a = torch.randn(64, 64)
    for step in (1, 2, 3):
        trace.on_step_begin(None, state, None)
        for _ in range(step):
            (a @ a).sum().item()
        if step == 3:
            gc.collect()  # a garbage-collection pause inside step 3
        state.global_step = step
        trace.on_step_end(None, state, None)
    trace.on_train_end(None, state, None)

    times = json.loads((tmp_path / "trace" / "step-times-rank1.json").read_text())
    assert times["rank"] == 1 and [s["step"] for s in times["steps"]] == [1, 2, 3]
    assert all(0 < s["s"] <= s["period"] for s in times["steps"])
    assert times["steps"][2]["gc_s"] > 0 and gc.callbacks.count(trace._gc_pause) == 0  # unhooked at the end
    profile = json.loads((tmp_path / "trace" / "profile-rank1.json").read_text())
    assert profile["step"] == 2 and profile["rank"] == 1 and profile["gpu"] is False
    assert "aten::mm" in {op["name"] for op in profile["top_host_ops"]}
    assert "aten::mm" in (tmp_path / "trace" / "profile-rank1.txt").read_text()
    assert not (tmp_path / "trace" / "profile-rank0.json").exists()


def waiting_for_the_other_rank(seconds: float) -> None:
    time.sleep(seconds)  # stands in for whatever stalls a step


def test_a_stalled_step_records_where_the_main_thread_was(tmp_path, monkeypatch):
    """Host and drain time per step; a step past 3x the median (and STALL_MIN_S) gets the main thread's stacks."""
    monkeypatch.setattr(steptrace, "STALL_MIN_S", 0.1)
    monkeypatch.setattr(steptrace, "STALL_EVERY_S", 0.05)
    trace = steptrace.StepTrace(tmp_path, rank=0)
    state = SimpleNamespace(global_step=0)
    trace.on_train_begin(None, state, None)
    for step in range(1, 6):
        trace.on_step_begin(None, state, None)
        waiting_for_the_other_rank(0.4 if step == 5 else 0.01)
        state.global_step = step
        trace.on_step_end(None, state, None)
    steps = trace.steps
    assert all(abs(s["host_s"] + s["drain_s"] - s["s"]) < 1e-3 for s in steps)
    assert not any("stacks" in s for s in steps[:4])  # no median for the first three; the fourth is no stall
    stacks = steps[4]["stacks"]
    assert 2 <= len(stacks) <= steptrace.STALL_STACKS and stacks[0]["at_s"] >= 0.1
    assert all("waiting_for_the_other_rank" in "".join(s["stack"]) for s in stacks)
    assert trace._watch is None  # the watchdog thread has ended
    trace.on_train_end(None, state, None)
    saved = json.loads((tmp_path / "step-times-rank0.json").read_text())["steps"][4]
    assert saved["stacks"] == stacks


def test_off_without_the_environment(monkeypatch):
    monkeypatch.delenv(steptrace.TRACE_ENV, raising=False)
    assert steptrace.from_environment(rank=0) is None


def test_kernel_kinds():
    assert steptrace.kernel_kind("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevComm*, unsigned long)") == "nccl"
    assert steptrace.kernel_kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert steptrace.kernel_kind("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN") == "matmul"
    assert steptrace.kernel_kind("Memcpy HtoD (Pinned -> Device)") == "copy"
    assert steptrace.kernel_kind("_rms_norm_forward_kernel") == "other"
