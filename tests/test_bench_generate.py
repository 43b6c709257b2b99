"""`finechat bench generate` on CPU: the tiny architecture runs every system end to end and writes the JSON the issue
documents; the engine's greedy tokens equal generate's there; bad flags are one-line errors with exit code 2."""

import json

import pytest

from finechat.bench.generate import card, parse_counts
from finechat.cli import main


def test_tiny_dry_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "decode.json"
    argv = ["bench", "generate", "--arch", "tiny", "--weights", "bf16", "--prompt-tokens", "16", "--new-tokens", "8"]
    argv += ["--long-prompt", "40", "--streams", "1,2", "--model-dir", str(tmp_path / "m"), "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "decode" and result["device"] == "cpu"
    rows = {(r["system"], r["streams"], r["prompt_tokens"]): r for r in result["rows"]}
    assert set(rows) == {
        ("transformers", 1, 16),
        ("transformers", 1, 40),
        ("finechat-first", 1, 16),
        ("finechat", 1, 16),
        ("finechat", 1, 40),
        ("finechat-server", 1, 16),
        ("finechat-server", 2, 16),
        ("finechat-unfused", 1, 16),
        ("finechat-eager", 1, 16),
    }
    assert all(r["weights"] == "bf16" and r["ttft_ms"] > 0 for r in rows.values())
    assert all(r["tok_s"] > 0 for (system, _, prompt), r in rows.items() if prompt == 16)
    # the same weights, greedy: the engine's tokens are generate's
    assert rows["finechat", 1, 16]["greedy_equal"] == rows["finechat", 1, 16]["compared"] == 8
    assert rows["finechat-server", 2, 16]["new_tokens"] == 16
    per_step = rows["finechat-server", 2, 16]["decode_thread_ms_per_step"]  # where the decode thread's time goes
    assert per_step["step"] > 0 and per_step["loop"] >= per_step["step"] + per_step["emit"]
    engine = result["engines"]["bf16"]
    assert engine["fused_check"] == "unavailable" and not engine["cuda_graphs"]  # the CPU decodes eagerly
    assert {"bf16_first_reply_vs_later", "bf16_warmup_s", "bf16_ttft_long_prompt_ms"} <= set(result["targets"])
    assert result["targets"]["bf16_greedy_equal_tokens"] == {"target": 8, "got": 8, "met": True}
    assert "finechat-server" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--weights", "int8"], "--weights"),
        (["--streams", "1,zero"], "--streams"),
        (["--new-tokens", "1"], "--new-tokens"),
        (["--arch", "mistral-7b"], "CUDA"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, capsys, tmp_path):
    import torch

    if message == "CUDA" and torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    assert main(["bench", "generate", *flags, "--output", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_parsers():
    assert parse_counts("1, 4,16", "--streams") == [1, 4, 16]
    assert card("NVIDIA H100 80GB HBM3") == "h100" and card("NVIDIA H200") == "h200"


def test_a_graphs_profile_reads_per_replay():
    """The kernel table of a profiled graph replay (5 replays profiled) in one replay's microseconds; a profile that
    saw no kernel inside the graph says so instead of reading zeros."""
    from finechat.bench.generate import per_replay

    summary = {"gpu": True, "gpu_ms": 40.0, "gpu_ms_by_kind": {"other": 30.0, "matmul": 10.0}, "kernels": 1600}
    summary["top_kernels"] = [{"name": "nf4_matmul_kernel", "count": 1120, "ms": 25.0}]
    got = per_replay(summary, 5)
    assert got["gpu_us"] == 8000.0 and got["gpu_us_by_kind"] == {"other": 6000.0, "matmul": 2000.0}
    assert got["kernels"] == 320 and got["top_kernels"] == [{"name": "nf4_matmul_kernel", "count": 224, "us": 5000.0}]
    assert per_replay({"gpu": False}, 5) == {"gpu": False}
