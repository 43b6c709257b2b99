"""The multi-GPU benchmark's CPU-runnable parts: its dry run (the same code path: real `finechat train` runs, one
process and DDP over gloo) and the way it reads and sums up runs."""

import json

import pytest
import torch

from finechat import runs
from finechat.bench import multigpu


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dry run; GPUs: benchmarks/run_multigpu_bench.sh")
def test_cpu_dry_run_writes_the_results_json(tmp_path):
    argv = ["--arch", "tiny", "--device", "cpu", "--modes", "single,ddp,fsdp", "--batch-size", "2", "--seq", "64"]
    argv += ["--steps", "4", "--warmup", "1", "--workdir", str(tmp_path / "work")]
    argv += ["--model-dir", str(tmp_path / "model"), "--output", f"{tmp_path}/results/"]
    assert multigpu.main(argv) == 0
    (path,) = (tmp_path / "results").glob("multigpu-cpu-*.json")
    result = json.loads(path.read_text())
    assert result["kind"] == "multigpu" and result["device"] == "cpu"
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["single"]["gpus"] == 1 and rows["ddp"]["gpus"] == 2
    for mode in ("single", "ddp"):
        row = rows[mode]
        assert row["tok_s"] > 0 and row["steps"] == 4 and "error" not in row, row
        assert row["tok_s"] == row["tok_s_from_mean_period"] and row["tok_s_logged"] > 0  # the periods' rate
        assert row["peak_gib"] is None  # no GPU memory on CPU
        assert row["timed_steps"] == 2  # steps 2 and 3: after the warm-up, before the profiled step 4
        ranks = ["0"] if mode == "single" else ["0", "1"]
        assert list(row["step_s"]) == ranks and all(len(row["step_s"][r]) == 2 for r in ranks)
        assert all(0 < row["step_s_median"][r] <= row["period_s_median"][r] for r in ranks)
        assert row["profile"]["step"] == 4 and row["profile"]["top_host_ops"], row["profile"]
        assert list(row["profile_by_rank"]) == ranks
    assert "needs CUDA" in rows["fsdp"]["error"]
    assert result["summary"]["adapters_alike"] is True and result["summary"]["ddp_speedup_plain_path"] > 0
    assert json.loads((tmp_path / "work/runs/ddp-plain/finechat.json").read_text())["processes"] == 2


def test_reads_tokens_per_second_after_the_warmup(tmp_path):
    for step, rate in enumerate([100.0, 900.0, 1000.0, 1100.0], start=1):
        runs.append_metrics(tmp_path, {"step": step, "loss": 2.0, "tokens_per_s": rate, "peak_gib": step / 2})
    runs.append_metrics(tmp_path, {"step": 4, "eval_loss": 1.9})
    got = multigpu.read_metrics(tmp_path, warmup=1)
    assert got == {"tok_s": 1000, "peak_gib": 2.0, "steps": 4, "timed_steps": 3, "loss": 2.0}
    assert multigpu.read_metrics(tmp_path, warmup=1, profiled=4)["tok_s"] == 950  # the profiled step left out
    assert multigpu.read_metrics(tmp_path / "missing", warmup=1) == {}


def test_reads_step_times_of_every_rank_and_the_profiles(tmp_path):
    for rank, base in ((0, 0.5), (1, 0.6)):
        steps = [{"step": i, "s": base * i, "period": base * i + 0.1} for i in range(1, 6)]
        (tmp_path / f"step-times-rank{rank}.json").write_text(json.dumps({"rank": rank, "steps": steps}))
        profile = {"rank": rank, "wall_ms": 900.0, "gpu_ms": 850.0, "gpu_ms_by_kind": {"nccl": 3.0}, "kernels": 9}
        (tmp_path / f"profile-rank{rank}.json").write_text(json.dumps({**profile, "top_kernels": [], "host_waits": {}}))
    got = multigpu.read_trace(tmp_path, warmup=2, profiled=5, tokens_per_step=1000)
    assert got["step_s"] == {"0": [1.5, 2.0], "1": [1.8, 2.4]}
    assert got["step_s_median"] == {"0": 1.75, "1": 2.1} and got["period_s_median"]["0"] == 1.85
    assert got["tok_s_from_period"] == round(1000 / 1.85)
    assert got["profile"]["rank"] == 0 and set(got["profile_by_rank"]) == {"0", "1"}
    assert got["profile_by_rank"]["1"]["gpu_ms_by_kind"] == {"nccl": 3.0}
    assert multigpu.read_trace(tmp_path / "missing", 2, 5, 1000) == {}
    assert "stalled_steps" not in got


def test_steps_that_stall_are_listed_with_what_happened_in_them(tmp_path):
    steps = [{"step": i, "s": 0.5, "period": 0.6, "gc_s": 0.0, "device_allocs": 0} for i in range(1, 8)]
    steps[4].update(s=3.2, period=3.3, device_allocs=12)
    (tmp_path / "step-times-rank0.json").write_text(json.dumps({"rank": 0, "steps": steps}))
    got = multigpu.read_trace(tmp_path, warmup=1, profiled=None, tokens_per_step=1000)
    assert got["stalled_steps"] == {"0": [{"step": 5, "s": 3.2, "period": 3.3, "gc_s": 0.0, "device_allocs": 12}]}


def test_summary_states_the_targets():
    rows = [
        {"mode": "single", "gpus": 1, "tok_s": 3000, "peak_gib": 10.0, "adapter_layout": "a"},
        {"mode": "ddp", "gpus": 2, "tok_s": 5700, "peak_gib": 10.1, "adapter_layout": "a"},
        {"mode": "fsdp", "gpus": 2, "tok_s": 5000, "peak_gib": 8.0, "adapter_layout": "b"},
    ]
    s = multigpu.summarize(rows)
    assert s["ddp_speedup"] == 1.9 and s["ddp_scaling_efficiency"] == 0.95 and s["ddp_speedup_plain_path"] == 1.9
    assert s["fsdp_peak_over_single"] == 0.8 and s["adapters_alike"] is False
    table = multigpu.format_table({"device": "H100", "settings": vars(multigpu.Settings()), "rows": rows, "summary": s})
    assert "DDP speed-up, plain path: 1.90x" in table and "FSDP peak memory 0.80" in table

    fast = [
        {"mode": "single", "gpus": 1, "tok_s": 8000, "peak_gib": 6.0, "fast_path": True},
        {"mode": "ddp", "gpus": 2, "tok_s": 15200, "peak_gib": 6.1, "fast_path": True},
    ]
    s = multigpu.summarize(fast + rows)  # the fast path's speed-up is the headline; FSDP against the plain layers
    assert s["ddp_speedup"] == 1.9 and s["ddp_speedup_fast_path"] == 1.9 and s["ddp_speedup_plain_path"] == 1.9
    assert s["fsdp_peak_over_single"] == 0.8 and s["fsdp_compared_with_fast_path"] is False
    s = multigpu.summarize(fast + rows[2:])
    assert s["fsdp_peak_over_single"] == round(8.0 / 6.0, 3) and s["fsdp_compared_with_fast_path"] is True


def test_speedup_from_step_periods_with_stalls_in_and_ablations_aside():
    """The DDP speed-up comes from the step periods (mean, stalls in; median beside it), not the logged tokens/s;
    an optimizer ablation's rows are kept beside the default's and left out of the summary."""
    single = {"mode": "single", "gpus": 1, "tok_s": 3500, "fast_path": True}
    single |= {"tok_s_from_period": 10000, "tok_s_from_mean_period": 9800}
    ddp = {"mode": "ddp", "gpus": 2, "tok_s": 9500, "fast_path": True}
    ddp |= {"tok_s_from_period": 18400, "tok_s_from_mean_period": 12600}
    ablation = {**ddp, "tok_s_from_mean_period": 19600, "optimizer_ablation": "adamw_torch"}
    assert multigpu._row_key(ablation) != multigpu._row_key(ddp)
    s = multigpu.summarize([single, ddp, ablation])
    assert s["ddp_speedup"] == round(12600 / 9800, 3) and s["ddp_speedup_median_step"] == 1.84
    assert "ddp_speedup_ablation_optimizer_adamw_torch" not in s  # no single row of that ablation
    no_offload = [{**row, "offload_ablation": "off"} for row in (single, ddp)]
    no_offload[1]["tok_s_from_mean_period"] = 19000
    s = multigpu.summarize([single, ddp, *no_offload])
    assert s["ddp_speedup"] == round(12600 / 9800, 3) and s["ddp_speedup_ablation_offload_off"] == round(
        19000 / 9800, 3
    )
    accumulated = [{**row, "grad_accum": 4} for row in (single, ddp)]  # the shipped config's 4 micro-batches a step
    accumulated[1]["tok_s_from_mean_period"] = 19500
    s = multigpu.summarize([single, ddp, *accumulated])
    assert s["ddp_speedup"] == round(12600 / 9800, 3) and s["ddp_speedup_ablation_grad_accum_4"] == round(
        19500 / 9800, 3
    )
    table = multigpu.format_table({"device": "cpu", "settings": vars(multigpu.Settings()), "rows": [], "summary": s})
    assert "DDP speed-up, 4 micro-batches a step: 1.99x" in table


def test_every_mode_trains_with_the_bench_micro_batches(tmp_path):
    """--grad-accum reaches `finechat train`: the step periods then span that many micro-batches each."""
    settings = multigpu.Settings(grad_accum=4)
    flags = multigpu.train_flags(settings, tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "run")
    assert flags[flags.index("--grad-accum") + 1] == "4" and flags[flags.index("--batch-size") + 1] == "4"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--modes", "ddp,zero3"], "--modes: expected some of single, ddp, fsdp"),
        (["--arch", "mistral-7b", "--device", "cpu"], "use --arch tiny for a CPU dry run"),
        (["--arch", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "3"], "must be larger than --warmup"),
        (["--arch", "tiny", "--device", "cpu", "--gpus", "1"], "--gpus must be 2 or more"),
    ],
)
def test_bad_settings_are_one_line_errors(argv, message, capsys, tmp_path):
    assert multigpu.main(argv + ["--workdir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before building anything


def test_card_names():
    assert multigpu.card_name("NVIDIA H100 80GB HBM3") == "h100"
    assert multigpu.card_name("NVIDIA H200") == "h200"
    assert multigpu.card_name("cpu") == "cpu"


def test_the_finechat_command_runs_the_bench_with_its_flags(capsys, tmp_path):
    """`finechat bench multigpu ...` is `python -m finechat.bench.multigpu ...`, its errors named after it."""
    from finechat import cli

    assert cli.main(["bench", "multigpu", "--modes", "zero3", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("finechat bench multigpu: error: --modes: expected some of") and err.count("\n") == 1
    assert cli.main(["-v", "bench", "multigpu", "--modes", "zero3", "--workdir", str(tmp_path)]) == 2  # after -v too
    assert capsys.readouterr().err.startswith("finechat bench multigpu: error: --modes")
    with pytest.raises(SystemExit) as done:
        cli.main(["bench", "multigpu", "--help"])
    assert done.value.code == 0 and "usage: finechat bench multigpu" in capsys.readouterr().out


def test_numa_binding_reaches_finechat_train_as_an_ablation(tmp_path):
    """--numa-binding pins every process of every mode (train's --numa-binding); its rows are kept aside."""
    for bound in (False, True):
        flags = multigpu.train_flags(multigpu.Settings(numa_binding=bound), tmp_path / "m", tmp_path / "d", tmp_path)
        assert ("--numa-binding" in flags) is bound and ("--no-numa-binding" in flags) is not bound
    row = {"mode": "ddp", "gpus": 2, "fast_path": True, "numa_ablation": "bound"}  # "no-op" on one NUMA node
    assert multigpu._ablation_name(row) == "numa_bound"
    assert multigpu._row_key(row) != multigpu._row_key({k: v for k, v in row.items() if k != "numa_ablation"})


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU dry run; GPUs: benchmarks/run_multigpu_bench.sh")
def test_cpu_dry_run_on_chat_records(tmp_path):
    """--chat: `finechat train` on chat records of many lengths (a word tokenizer with a chat template of its own, in a
    folder of links to the shared model's files); the row says so and is kept beside packed text's."""
    argv = ["--arch", "tiny", "--device", "cpu", "--modes", "single", "--batch-size", "2", "--seq", "128", "--chat"]
    argv += ["--steps", "4", "--warmup", "1", "--workdir", str(tmp_path / "work"), "--no-profile"]
    argv += ["--model-dir", str(tmp_path / "model"), "--output", f"{tmp_path}/results/"]
    assert multigpu.main(argv) == 0
    (path,) = (tmp_path / "results").glob("multigpu-cpu-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["data"] == "chat" and row["tok_s"] > 0 and row["steps"] == 4 and "error" not in row, row
    chats = [json.loads(line) for line in (tmp_path / "work/chats.jsonl").read_text().splitlines()]
    lengths = {len(c["messages"][0]["content"].split()) for c in chats}
    assert len(chats) == 4 * 2 * 2 * 5 // 4 + 20 and min(lengths) >= 8 and max(lengths) <= 64 and len(lengths) > 10
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "model").chat_template is None  # the shared folder as it was
    assert AutoTokenizer.from_pretrained(tmp_path / "work/model-chat").chat_template == multigpu.CHAT_TEMPLATE
    assert json.loads((tmp_path / "work/runs/single-plain-data_chat/finechat.json").read_text())
