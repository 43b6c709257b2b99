"""GPU probe: `finechat train` on chat records, padded (the default) against `--packing`, as a user runs it: the real
CLI in a subprocess, the Mistral-7B architecture with random weights, NF4, the fast path. Not a test; a measurement
for docs/benchmarks.md, run on an H100/H200:

    PYTHONPATH=src python3 benchmarks/probes/packing_train.py [output.json]

(ARCH=tiny STEPS=6 WARMUP=2 runs it on the CPU, a dry run.)

The records are `finechat bench multigpu --chat`'s: a user and an assistant turn of 8 to 512 random words each
(max_seq_length 1,024, batch 4). Each run trains STEPS steps (default 80); tokens/s is the records' own tokens (the
Trainer's non-padding count) over the logged steps after WARMUP (default 40; the padded run graphs up to 16 shapes,
each captured at its second batch)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from packing import report  # the step-loop probe beside this file (the script's folder is on sys.path)

from finechat import runs
from finechat.bench import multigpu
from finechat.bench.train import ARCHS


def main() -> None:
    arch = os.environ.get("ARCH", "mistral-7b")
    steps, warmup = int(os.environ.get("STEPS", 80)), int(os.environ.get("WARMUP", 40))
    cuda = torch.cuda.is_available()
    work = Path("/tmp/finechat-packing-train")
    settings = multigpu.Settings(
        arch=arch, steps=steps, chat=True, fast_path=True, device="cuda" if cuda else "cpu", workdir=str(work)
    )
    if not cuda:
        settings.seq, settings.quantize = 128, "none"
    model_dir = multigpu.prepare_model(arch, Path(f"/tmp/finechat-bench-{arch}"))
    model_dir = multigpu.with_chat_template(model_dir, work / "model-chat")
    data = multigpu.prepare_chats(work / "chats.jsonl", ARCHS[arch]["vocab_size"], 2000, settings.seq)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "arch": arch, "steps": steps, "rows": []}
    for packed in (False, True):
        run_dir = work / ("packed" if packed else "padded")
        flags = multigpu.train_flags(settings, model_dir, data, run_dir) + (["--packing"] if packed else [])
        log = work / f"{run_dir.name}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with log.open("w") as out:
            code = subprocess.run(
                [sys.executable, "-m", "finechat", *flags, "--overwrite"], stdout=out, stderr=subprocess.STDOUT, env=env
            ).returncode
        logged = [r for r in runs.read_metrics(run_dir) if "loss" in r]
        timed = [r for r in logged if r["step"] > warmup]
        seconds = sum(
            (r["tokens_seen"] - p["tokens_seen"]) / r["tokens_per_s"]
            for p, r in zip(logged, logged[1:], strict=False)
            if r["step"] > warmup and r["tokens_per_s"]
        )
        tokens = timed[-1]["tokens_seen"] - logged[warmup - 1]["tokens_seen"] if timed else 0
        row = {
            "layout": "packed" if packed else "padded",
            "exit_code": code,
            "record_tok_s": round(tokens / seconds) if seconds else None,
            "timed_steps": len(timed),
            "record_tokens_per_step": round(tokens / len(timed)) if timed else None,
            "peak_gib": max((r.get("peak_gib") or 0 for r in logged), default=None),
            "loss": logged[-1]["loss"] if logged else None,
        }
        if code:
            row["log_tail"] = log.read_text()[-2000:]
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    report(result)


if __name__ == "__main__":
    main()
