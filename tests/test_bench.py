"""`finechat bench train` on CPU: the tiny architecture runs both systems end to end and writes the documented JSON;
bad flags are one-line errors with exit code 2."""

import json

import pytest

from finechat.bench.train import _paired, format_table, parse_lengths, parse_shapes
from finechat.cli import main


def test_tiny_dry_run_writes_rows_for_both_systems(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--arch", "tiny", "--shapes", "2x32", "--steps", "1", "--warmup", "0"]
    argv += ["--systems", "finechat,seed,finechat-bnbadamw", "--ablation-shapes", "2x32", "--longest", "64"]
    argv += ["--model-dir", str(tmp_path / "m"), "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "train" and result["device"] == "cpu"
    rows = {(r["system"], r["shape"]): r for r in result["rows"]}
    assert set(rows) == {("finechat", "2x32"), ("seed", "2x32"), ("finechat", "1x64"), ("finechat-bnbadamw", "2x32")}
    assert all(r["tok_s"] > 0 and "peak_gib" in r for r in rows.values())
    assert all(0 < r["step_ms_min"] <= r["step_ms_median"] and r["host_cpu_s"] > 0 for r in rows.values())
    assert all(r["process_cpu_s"] >= r["host_cpu_s"] for r in rows.values())
    assert result["longest_sequence"]["largest_trained"] == 64
    assert "2x32" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--shapes", "4by512"], "--shapes"),
        (["--systems", "unsloth"], "--systems"),
        (["--longest", "lots"], "--longest"),
        (["--pairs", "-1"], "--pairs"),
        (["--arch", "mistral-7b"], "CUDA"),
    ],
)
def test_bad_flags_are_one_line_errors(flags, message, capsys, tmp_path):
    import torch

    if message == "CUDA" and torch.cuda.is_available():
        pytest.skip("checks the CPU refusal")
    assert main(["bench", "train", *flags, "--output", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_parsers_and_table():
    assert parse_shapes("4x512, 1x2048") == [(4, 512), (1, 2048)] and parse_lengths("") == []
    rows = [
        {"system": "finechat", "shape": "8x1024", "tok_s": 9000, "peak_gib": 6.0},
        {"system": "seed", "shape": "8x1024", "tok_s": 3000, "peak_gib": 12.0},
    ]
    table = format_table({"device": "GPU", "arch": "mistral-7b", "rows": rows})
    assert "8x1024 | 9,000 (6.00) | 3,000 (12.00) | 3.00x | 0.50x" in table


def test_pairs_put_each_ablation_right_after_finechat(tmp_path, capsys):
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--arch", "tiny", "--shapes", "2x32", "--steps", "1", "--warmup", "0"]
    argv += ["--systems", "finechat,finechat-bnbadamw", "--ablation-shapes", "2x32", "--pairs", "2"]
    argv += ["--model-dir", str(tmp_path / "m"), "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    order = [(r["system"], r.get("paired_with"), r.get("pair")) for r in result["rows"]]
    assert order == [
        ("finechat", None, None),  # the main row
        ("finechat", "finechat-bnbadamw", 0),
        ("finechat-bnbadamw", None, 0),
        ("finechat", "finechat-bnbadamw", 1),
        ("finechat-bnbadamw", None, 1),
    ]
    (summary,) = result["pairs"]
    assert summary["system"] == "finechat-bnbadamw" and summary["pairs"] == 2 and len(summary["gains"]) == 2
    assert "pairs at 2x32: finechat-bnbadamw" in capsys.readouterr().out


def test_paired_gain_is_the_median_of_the_pairs_ratios():
    def pair(k, base, ablated):
        return [
            {"system": "finechat", "shape": "1x2048", "tok_s": base, "paired_with": "finechat-nographs", "pair": k},
            {"system": "finechat-nographs", "shape": "1x2048", "tok_s": ablated, "ablation": True, "pair": k},
        ]

    rows = pair(0, 6000, 5000) + pair(1, 9000, 6000) + pair(2, 5500, 5000)
    (p,) = _paired(rows)
    assert p["gains"] == [0.2, 0.5, 0.1] and p["gain_median"] == 0.2 and p["pairs"] == 3
    assert p["finechat_tok_s_median"] == 6000 and p["ablation_tok_s_median"] == 5000
