"""GPU probe: where a finechat training step at 8x1024 tokens leaves the GPU's compute stream idle, and what keeping
the last layers' checkpoints and kept attention on the GPU buys (finechat.offload.Offloader.resident: backward needs
them first, right after forward, while the copies to the host may still be queued). Mistral-7B architecture with
random weights, `finechat bench train`'s model and step. Not a test; a measurement for docs/benchmarks.md:

    PYTHONPATH=src python3 benchmarks/probes/step_gaps.py [output.json]

(ARCH=tiny SHAPE=2x64 runs it on the CPU as a dry run: no trace there.)

1. One profiled step: the compute stream's idle gaps (the stream with the most kernel time), the largest ones with
   the kernels around them and where in the step they fall, and the host<->GPU copies' spans.
2. Pairs: `resident` 1 (the default) against other values, each timed right after the default on the same model,
   3 pairs each; tokens/s and peak memory allocated."""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from finechat import fastpath
from finechat.bench import train as bench

VARIANTS = [0, 2, 3, 4]
PAIRS = 3


def main() -> None:
    arch = os.environ.get("ARCH", "mistral-7b")
    bs, seq = (int(n) for n in os.environ.get("SHAPE", "8x1024").split("x"))
    cuda = torch.cuda.is_available()
    settings = bench.BenchSettings(arch=arch)
    path = bench.make_random_model(arch, Path(f"/tmp/finechat-bench-{arch}"))
    model, step = bench._finechat(path, settings)
    offloader = fastpath.offloader(model)
    assert offloader is not None
    batch = bench._batch(bs, seq, model.config.vocab_size, 0.0, "cuda" if cuda else "cpu")
    result: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "arch": arch, "shape": f"{bs}x{seq}"}
    for _ in range(3):
        step(*batch)
    bench.sync()
    if cuda:
        try:
            result["gaps"] = gaps(step, batch)
        except Exception as e:  # the trace's format: report it, and go on to the pairs
            result["gaps"] = {"error": repr(e), "largest": []}
        print(json.dumps({k: v for k, v in result["gaps"].items() if k != "largest"}), flush=True)
        for gap in result["gaps"]["largest"][:12]:
            print(json.dumps(gap), flush=True)
    rows = []
    for variant in VARIANTS:
        for pair in range(PAIRS):
            for resident in (1, variant):
                offloader.resident = resident
                rows.append({"resident": resident, "pair": pair, **timed(step, batch, bs * seq, cuda)})
                print(json.dumps(rows[-1]), flush=True)
    offloader.resident = 1
    result["rows"] = rows
    summary = {}
    for variant in VARIANTS:
        ratios = sorted(
            b["tok_s"] / a["tok_s"]
            for a, b in zip(rows[0::2], rows[1::2], strict=True)
            if b["resident"] == variant and a["resident"] == 1
        )
        summary[str(variant)] = round(ratios[len(ratios) // 2] - 1, 4)
    result["median_gain_over_resident_1"] = summary
    print(json.dumps({"median_gain_over_resident_1": summary}), flush=True)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("step-gaps.json")
    out.write_text(json.dumps(result, indent=1))
    print(f"written to {out}", flush=True)


def timed(step, batch, tokens: int, cuda: bool) -> dict:
    bench.free_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(*batch)
    bench.sync()
    start = time.perf_counter()
    for _ in range(5):
        step(*batch)
    bench.sync()
    seconds = (time.perf_counter() - start) / 5
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    return {"tok_s": round(tokens / seconds), "step_ms": round(1000 * seconds, 1), "peak_gib": peak}


def gaps(step, batch) -> dict:
    """One step under the profiler, its trace read back: the compute stream's gaps between kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall = time.perf_counter()
        step(*batch)
        bench.sync()
        wall = time.perf_counter() - wall
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and "dur" in e]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "dur" in e]
    busy: dict = {}
    for e in kernels:
        busy[e["args"].get("stream")] = busy.get(e["args"].get("stream"), 0) + e["dur"]
    main_stream = max(busy, key=busy.get)
    stream = sorted((e for e in kernels if e["args"].get("stream") == main_stream), key=lambda e: e["ts"])
    start, end = stream[0]["ts"], max(e["ts"] + e["dur"] for e in stream)
    found = []
    for prev, nxt in zip(stream, stream[1:], strict=False):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap > 20:
            found.append(
                {
                    "at_ms": round((prev["ts"] + prev["dur"] - start) / 1000, 2),
                    "gap_ms": round(gap / 1000, 3),
                    "after": prev["name"][:80],
                    "before": nxt["name"][:80],
                }
            )
    span = end - start
    tenths = [0.0] * 10
    for g in found:
        tenths[min(int(g["at_ms"] * 1000 / span * 10), 9)] += g["gap_ms"]
    d2h = [e for e in copies if "DtoH" in e["name"] or "Device -> Pageable" in e["name"] or "D2H" in e["name"]]
    h2d = [e for e in copies if e not in d2h]
    return {
        "wall_ms": round(1000 * wall, 1),
        "kernel_span_ms": round(span / 1000, 1),
        "kernel_ms": round(busy[main_stream] / 1000, 1),
        "gap_ms_total": round(sum(g["gap_ms"] for g in found), 1),
        "gap_ms_by_tenth_of_the_step": [round(t, 1) for t in tenths],
        "gaps_over_20us": len(found),
        "d2h_ms": round(sum(e["dur"] for e in d2h) / 1000, 1),
        "d2h_last_end_ms": round((max((e["ts"] + e["dur"] for e in d2h), default=start) - start) / 1000, 1),
        "h2d_ms": round(sum(e["dur"] for e in h2d) / 1000, 1),
        "h2d_first_start_ms": round((min((e["ts"] for e in h2d), default=start) - start) / 1000, 1),
        "copy_names": sorted({e["name"] for e in copies})[:6],
        "largest": sorted(found, key=lambda g: -g["gap_ms"])[:30],
    }


if __name__ == "__main__":
    main()
