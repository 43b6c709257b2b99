"""GPU probe: chat records trained padded (as `finechat train` batches them) against packed (`finechat train
--packing`), on the Mistral-7B architecture with random weights (finechat bench train's model and step). Not a test;
a measurement for docs/benchmarks.md, run on an H100/H200:

    PYTHONPATH=src python3 benchmarks/probes/packing.py [output.json]

(ARCH=tiny runs it on the CPU, a dry run.)

The same 256 records, of log-uniform lengths from 32 to 1,024 tokens (seeded), one model:
- padded: batches of 4 records in shuffled order, each right-padded to a multiple of 64 tokens past its longest
  record, trained without the padding mask (finechat's Trainer; pads labelled -100), graphed per shape;
- packed: TRL's best-fit-decreasing packing into rows of 1,024 tokens (trl.pack_dataset), batches of 4 rows
  flattened by TRL's padding-free collator and finechat.packing.PackedBatches into one row padded to a multiple of
  1,024 tokens, trained with finechat.packing.Segments (flash attention's variable-length kernel), graphed per
  bucket (up to 4,096 tokens).
Each runs two passes over the records to warm up (compiles, graph captures), then one timed pass. Reported: the
records' own tokens per second (what a user's epoch takes), the tokens computed (with padding), steps, the graphs
held and peak memory."""

import json
import os
import random
import sys
import time
from pathlib import Path

import torch

from finechat import fastpath, packing
from finechat.bench import train as bench

RECORDS, BATCH, ROW = 256, 4, 1024


def lengths(n: int) -> list[int]:
    draw = random.Random(0)
    return [int(32 * 32 ** draw.random()) for _ in range(n)]


def padded_batches(records: list[list[int]], device: str) -> list[tuple]:
    order = random.Random(1).sample(range(len(records)), len(records))
    batches = []
    for start in range(0, len(order), BATCH):
        rows = [records[i] for i in order[start : start + BATCH]]
        width = -(-max(map(len, rows)) // 64) * 64
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row)
            labels[r, : len(row)] = torch.tensor(row)
        batches.append((ids.to(device), labels.to(device), None))
    return batches


def packed_batches(records: list[list[int]], device: str) -> list[tuple]:
    from datasets import Dataset
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = pack_dataset(Dataset.from_dict({"input_ids": records, "labels": records}), ROW, "bfd")
    rows = rows.shuffle(seed=1)
    collate = packing.PackedBatches(
        DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True, pad_to_multiple_of=ROW)
    )
    batches = []
    for start in range(0, len(rows), BATCH):
        batch = collate([rows[i] for i in range(start, min(start + BATCH, len(rows)))])
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batches.append((batch["input_ids"], batch["labels"], packing.Segments.of(batch)))
    return batches


def main() -> None:
    arch = os.environ.get("ARCH", "mistral-7b")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    settings = bench.BenchSettings(arch=arch)
    path = bench.make_random_model(arch, Path(f"/tmp/finechat-bench-{arch}"))
    model, step = bench._finechat(path, settings)
    vocab = model.config.vocab_size
    draw = random.Random(2)
    records = [[draw.randrange(1, vocab) for _ in range(n)] for n in lengths(RECORDS)]
    real = sum(map(len, records))
    graphs = fastpath.layer_graphs(model)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "arch": arch,
        "records": RECORDS,
        "record_tokens": real,
        "batch": BATCH,
        "row": ROW,
        "rows": [],
    }
    for name, batches in (("padded", padded_batches(records, device)), ("packed", packed_batches(records, device))):
        if graphs is not None:
            graphs.clear()
        bench.free_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def run(batch: tuple) -> None:
            ids, labels, segments = batch
            loss = fastpath.causal_lm_loss(model, ids, labels, None, segments)
            loss.backward()
            step.optimizer.step()
            step.optimizer.zero_grad(set_to_none=True)

        for _ in range(2):
            for batch in batches:
                run(batch)
        bench.sync()
        start = time.perf_counter()
        for batch in batches:
            run(batch)
        bench.sync()
        seconds = time.perf_counter() - start
        computed = sum(b[0].numel() for b in batches)
        row = {
            "layout": name,
            "record_tok_s": round(real / seconds),
            "computed_tok_s": round(computed / seconds),
            "seconds": round(seconds, 2),
            "steps": len(batches),
            "tokens_computed": computed,
            "padding_share": round(1 - real / computed, 3),
            "shapes": len({tuple(b[0].shape) + ((b[2].bucket(),) if b[2] else ()) for b in batches}),
            "layer_graphs": graphs.captured() if graphs is not None else 0,
            "layer_backward_graphs": graphs.captured_backward() if graphs is not None else 0,
            "failed": (graphs.failed or graphs.failed_backward) if graphs is not None else "",
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        }
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    report(result)


def report(result: dict) -> None:
    """The packed row's records' tokens/s over the padded row's, printed and added to result; result written to the
    path given on the command line (benchmarks/probes/packing_train.py reports through this too)."""
    padded, packed = result["rows"]
    if padded["record_tok_s"] and packed["record_tok_s"]:
        result["packed_over_padded"] = round(packed["record_tok_s"] / padded["record_tok_s"], 3)
        print("packed over padded, records' tokens/s:", result["packed_over_padded"], flush=True)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
