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
    argv += ["--steps", "3", "--warmup", "1", "--workdir", str(tmp_path / "work")]
    argv += ["--model-dir", str(tmp_path / "model"), "--output", f"{tmp_path}/results/"]
    assert multigpu.main(argv) == 0
    (path,) = (tmp_path / "results").glob("multigpu-cpu-*.json")
    result = json.loads(path.read_text())
    assert result["kind"] == "multigpu" and result["device"] == "cpu"
    rows = {r["mode"]: r for r in result["rows"]}
    assert rows["single"]["gpus"] == 1 and rows["ddp"]["gpus"] == 2
    for mode in ("single", "ddp"):
        assert rows[mode]["tok_s"] > 0 and rows[mode]["steps"] == 3 and "error" not in rows[mode], rows[mode]
        assert rows[mode]["peak_gib"] is None  # no GPU memory on CPU
    assert "needs CUDA" in rows["fsdp"]["error"]
    assert result["summary"]["adapters_alike"] is True and result["summary"]["ddp_speedup"] > 0
    assert json.loads((tmp_path / "work/runs/ddp/finechat.json").read_text())["processes"] == 2


def test_reads_tokens_per_second_after_the_warmup(tmp_path):
    for step, rate in enumerate([100.0, 900.0, 1000.0, 1100.0], start=1):
        runs.append_metrics(tmp_path, {"step": step, "loss": 2.0, "tokens_per_s": rate, "peak_gib": step / 2})
    runs.append_metrics(tmp_path, {"step": 4, "eval_loss": 1.9})
    got = multigpu.read_metrics(tmp_path, warmup=1)
    assert got == {"tok_s": 1000, "peak_gib": 2.0, "steps": 4, "timed_steps": 3, "loss": 2.0}
    assert multigpu.read_metrics(tmp_path / "missing", warmup=1) == {}


def test_summary_states_the_targets():
    rows = [
        {"mode": "single", "gpus": 1, "tok_s": 3000, "peak_gib": 10.0, "adapter_layout": "a"},
        {"mode": "ddp", "gpus": 2, "tok_s": 5700, "peak_gib": 10.1, "adapter_layout": "a"},
        {"mode": "fsdp", "gpus": 2, "tok_s": 5000, "peak_gib": 8.0, "adapter_layout": "b"},
    ]
    s = multigpu.summarize(rows)
    assert s["ddp_speedup"] == 1.9 and s["ddp_scaling_efficiency"] == 0.95
    assert s["fsdp_peak_over_single"] == 0.8 and s["adapters_alike"] is False
    table = multigpu.format_table({"device": "H100", "settings": vars(multigpu.Settings()), "rows": rows, "summary": s})
    assert "DDP speed-up 1.90x" in table and "FSDP peak memory 0.80" in table


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
