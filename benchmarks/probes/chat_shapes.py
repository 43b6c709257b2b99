"""GPU probe: training steps on chat-like batches of many shapes, as `finechat train` gets them from chat records
(TRL pads each batch on the right to a multiple of 64 tokens, finechat.train.pad_multiple), on the Mistral-7B
architecture with random weights (finechat bench train's model and step). Not a test; a measurement for
docs/benchmarks.md, run on an H100/H200:

    PYTHONPATH=src python3 benchmarks/probes/chat_shapes.py [output.json]

(ARCH=tiny runs it on the CPU, a dry run: no graphs there, so every policy runs eagerly.)

Batches of 4 rows, padded lengths 64, 128, ..., 1024 (16 shapes, 256 to 4,096 tokens), each row right-padded as
`finechat bench train --padding 0.25` pads it. The same shuffled order of batches runs under each policy, on one
model: layer graphs off; graphs kept for at most 2 shapes (finechat's limit before session 11); graphs kept for up to
finechat.layer_graphs.MAX_SHAPES shapes (now; `finechat train --cuda-graph-shapes`). Two passes over the 16 shapes
warm up (every shape eager, then captured), two more are timed. Reported per policy: tokens/s (pads counted, as the
steps compute them), the graphs held, peak memory allocated and reserved."""

import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from finechat import fastpath, layer_graphs
from finechat.bench import train as bench

BATCH = 4
LENGTHS = [64 * k for k in range(1, 17)]
POLICIES = {"no graphs": 0, "2 shapes": 2, "all shapes": layer_graphs.MAX_SHAPES}


def main() -> None:
    arch = os.environ.get("ARCH", "mistral-7b")
    cuda = torch.cuda.is_available()
    settings = bench.BenchSettings(arch=arch)
    path = bench.make_random_model(arch, Path(f"/tmp/finechat-bench-{arch}"))
    model, step = bench._finechat(path, settings)
    vocab = model.config.vocab_size
    graphs = fastpath.layer_graphs(model)
    assert graphs is not None, "the fast path's layer graphs are off"
    batches = {n: bench._batch(BATCH, n, vocab, 0.25, "cuda" if cuda else "cpu") for n in LENGTHS}
    order = random.Random(0)
    passes = [order.sample(LENGTHS, len(LENGTHS)) for _ in range(4)]
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "arch": arch,
        "batch": BATCH,
        "lengths": LENGTHS,
        "rows": [],
    }
    for name, shapes in POLICIES.items():
        fastpath.set_options(model, cuda_graphs=shapes > 0, cuda_graph_shapes=max(shapes, 1))
        bench.free_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for n in passes[0] + passes[1]:
            step(*batches[n])
        bench.sync()
        start, tokens = time.perf_counter(), 0
        for n in passes[2] + passes[3]:
            step(*batches[n])
            tokens += BATCH * n
        bench.sync()
        seconds = time.perf_counter() - start
        row = {
            "policy": name,
            "max_shapes": shapes,
            "tok_s": round(tokens / seconds),
            "seconds": round(seconds, 2),
            "steps": len(passes[2] + passes[3]),
            "graphed_shapes": len({shape for (_, shape), e in graphs._entries.items() if e.graph is not None}),
            "layer_graphs": graphs.captured(),
            "layer_backward_graphs": graphs.captured_backward(),
            "failed": graphs.failed or graphs.failed_backward,
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        }
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
