"""`finechat bench train` on CPU: the tiny architecture runs both systems end to end and writes the documented JSON;
bad flags are one-line errors with exit code 2."""

import json

import pytest

from finechat.bench import train as bench
from finechat.bench.train import _paired, format_table, parse_lengths, parse_shapes
from finechat.cli import main


def tiny_bench(tmp_path, shape: str, systems: str, *flags: str) -> dict:
    """`finechat bench train` on the tiny architecture, one timed step a row at shape (also the ablations' shape);
    the JSON it wrote."""
    out = tmp_path / "train.json"
    argv = ["bench", "train", "--arch", "tiny", "--shapes", shape, "--steps", "1", "--warmup", "0"]
    argv += ["--systems", systems, "--ablation-shapes", shape, *flags]
    argv += ["--model-dir", str(tmp_path / "m"), "--output", str(out)]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_tiny_dry_run_writes_rows_for_both_systems(tmp_path, capsys):
    result = tiny_bench(tmp_path, "2x32", "finechat,seed,finechat-bnbadamw", "--longest", "64")
    assert result["kind"] == "train" and result["device"] == "cpu"
    rows = {(r["system"], r["shape"]): r for r in result["rows"]}
    assert set(rows) == {("finechat", "2x32"), ("seed", "2x32"), ("finechat", "1x64"), ("finechat-bnbadamw", "2x32")}
    assert all(r["tok_s"] > 0 and "peak_gib" in r for r in rows.values())
    assert all(0 < r["step_ms_min"] <= r["step_ms_median"] and r["host_cpu_s"] > 0 for r in rows.values())
    assert all(r["process_cpu_s"] >= r["host_cpu_s"] for r in rows.values())
    assert result["longest_sequence"]["largest_trained"] == 64
    layers = bench.ARCHS["tiny"]["num_hidden_layers"]  # on CPU every layer keeps its attention half
    assert (
        rows[("finechat", "2x32")]["kept_attention_layers"] == layers
        and "kept_attention_layers" not in rows[("seed", "2x32")]
    )
    assert "2x32" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--shapes", "4by512"], "--shapes"),
        (["--systems", "unsloth"], "--systems"),
        (["--longest", "lots"], "--longest"),
        (["--pairs", "-1"], "--pairs"),
        (["--padding", "0.7"], "--padding"),
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
    result = tiny_bench(tmp_path, "2x32", "finechat,finechat-bnbadamw", "--pairs", "2")
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


def test_padded_batches_and_the_padding_mask_ablation(tmp_path):
    """--padding: right-padded batches (rows of different lengths, pads labelled -100); finechat trains them without
    the mask as `finechat train` does, finechat-paddingmask with it (tests/test_fastpath.py shows both give the
    real tokens' loss and gradients)."""
    from finechat.bench.train import _batch, _Step

    ids, labels, mask = _batch(4, 64, 100, 0.25, "cpu")
    lengths = mask.sum(1).tolist()
    assert lengths == [64, 53, 43, 32] and sum(64 - n for n in lengths) / (4 * 64) == pytest.approx(0.25, abs=0.01)
    assert bool((labels[mask == 0] == -100).all()) and bool((labels[mask == 1] == ids[mask == 1]).all())
    assert _batch(2, 32, 100, 0.0, "cpu")[2] is None
    result = tiny_bench(tmp_path, "4x32", "finechat,finechat-paddingmask", "--padding", "0.2", "--lora-dropout", "0")
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"finechat", "finechat-paddingmask"} and result["settings"]["padding"] == 0.2
    assert all(r["tok_s"] > 0 for r in rows.values())
    seen = []

    class Optimizer:
        def step(self):
            pass

        def zero_grad(self, set_to_none):
            pass

    def loss(ids, labels, mask):
        seen.append(mask)
        return (ids.float() * 0).sum().requires_grad_()

    step = _Step(loss, Optimizer())
    step(ids, labels, mask)
    step.keep_mask = True  # what finechat-paddingmask switches on
    step(ids, labels, mask)
    assert seen[0] is None and seen[1] is mask
