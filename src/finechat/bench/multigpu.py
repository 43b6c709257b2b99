"""`python -m finechat.bench.multigpu`: training tokens/s and peak GPU memory on one GPU, with DDP over N GPUs and
with FSDP-QLoRA over N GPUs, at the same per-GPU batch, on a random-weight model of a real architecture.

Every mode is a real `finechat train` run, started the way a user starts it (`finechat train ...` on one GPU,
`finechat train --gpus N --distributed ddp|fsdp` on N), on a model saved to a folder and loaded through
models.load_base, with a stand-in word-level tokenizer (the real one is not reachable offline) and random words as
data. The numbers come from the run's metrics.jsonl: tokens/s is rank 0's rate of all processes' tokens (summed over
GPUs) averaged over the steps after the warm-up, peak_gib rank 0's peak allocated memory during training. Results
go to benchmarks/results/multigpu-<card>-<date>.json after every mode, so a later failure keeps what was measured;
rows are keyed by mode and path (finechat's fast path or the plain Hugging Face layers), so a run of the other path
adds rows to the same file. `--chat` trains on chat records of many lengths instead (the tokenizer gets a chat
template in a folder of its own), so the padded batches come in many shapes as with real chat data; its rows, like
those of the other ablations (`--no-cuda-graphs`, `--no-offload`, ...), are kept beside the default's.

To explain a gap, every run is traced (finechat.steptrace): each process's wall time per step goes into the row
(`step_s`, `period_s` and their medians per rank) and the last step is profiled on every rank (`profile`: rank 0's
top kernels, NCCL among them, GPU time by kind, host waits; `profile_by_rank`: the totals of every rank). The
profiled step is left out of tokens/s.

`--arch tiny --device cpu` is a dry run of the same code path on CPU: DDP over gloo (FSDP needs CUDA)."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finechat.bench.common import save_word_tokenizer, versions, write_json
from finechat.errors import UserError

MODES = ("single", "ddp", "fsdp")
# Multi-GPU machines here: NVLink multicast off (../shared/gpu/README.md), also for the processes torchrun starts.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


DEFAULT_OPTIMIZER = "paged_adamw_32bit"  # finechat's default, as train() picks it
# Row fields that set a run apart from the default's rows. grad_accum: micro-batches per optimizer step, as the
# shipped Mistral config has (4): DDP then all-reduces once per 4 micro-batches, and the ranks wait for each other once.
ABLATIONS = ("optimizer_ablation", "offload_ablation", "numa_ablation", "grad_accum", "data", "graphs_ablation")
# --chat: every row is a chat record of user and assistant turns of random words, 8 words to half of --seq each, so
# that the padded batches come in many shapes (one per 64 tokens), as real chat data gives them
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant {% endif %}"
)


@dataclass
class Settings:
    """What one bench run measures; each field is a flag."""

    arch: str = "mistral-7b"
    gpus: int = 2
    modes: list[str] = field(default_factory=lambda: list(MODES))
    batch_size: int = 4  # sequences per GPU per micro-batch, the same in every mode
    grad_accum: int = 1  # micro-batches per optimizer step; more than 1 gives rows of their own, beside the default's
    seq: int = 1024
    steps: int = 16
    warmup: int = 4  # logged steps left out of tokens/s (and the last step, when profiled)
    quantize: str = "nf4"
    fast_path: bool = False  # finechat's fused layers in single and ddp (FSDP runs the Hugging Face layers always)
    profile: bool = True  # step times of every process, and a profile of the last step
    device: str = "cuda"
    workdir: str = "/tmp/finechat-multigpu"
    model_dir: str | None = None  # default /tmp/finechat-bench-<arch>, shared with finechat bench train
    output: str | None = None
    timeout_s: int = 480  # per run
    resume_check: bool = False  # resume ddp and fsdp from their checkpoints for two more steps
    logging_steps: int = 1  # the Trainer gathers the loss and token counts from every process at each logged step
    optimizer: str = DEFAULT_OPTIMIZER  # another one gives rows of their own, beside the default's (an ablation)
    offload: bool = True  # the fast path's activation offloading; off gives rows of their own (an ablation)
    numa_binding: bool = False  # each process pinned to its GPU's NUMA node (train's --numa-binding): an ablation
    chat: bool = False  # chat records of many lengths instead of packed text (rows of their own, data "chat")
    cuda_graphs: bool = True  # the fast path's layer graphs; off gives rows of their own (an ablation)


def run(settings: Settings, command: str) -> dict[str, Any]:
    """Prepare the model and data, train every mode, write and return the JSON results; prints a table last."""
    import torch

    from finechat.bench.train import ARCHS

    _check(settings, ARCHS)
    cuda = settings.device == "cuda"
    if cuda and torch.cuda.device_count() < max(settings.gpus if m != "single" else 1 for m in settings.modes):
        raise UserError(f"--gpus {settings.gpus}: this machine shows {torch.cuda.device_count()} CUDA GPU(s)")
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = f"multigpu-{card_name(device)}-{date[:10]}.json"
    output = Path(settings.output or "benchmarks/results/")
    if output.is_dir() or str(settings.output or "/").endswith("/"):
        output = output / name
    result: dict[str, Any] = {
        "kind": "multigpu",
        "device": device,
        "date": date,
        "command": command,
        "settings": asdict(settings),
        "software": versions(("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes")),
        "rows": _previous_rows(output),  # modes measured by an earlier call of the same day and card are kept
    }
    workdir = Path(settings.workdir)
    model_dir = prepare_model(settings.arch, Path(settings.model_dir or f"/tmp/finechat-bench-{settings.arch}"))
    vocab = ARCHS[settings.arch]["vocab_size"]
    if settings.chat:
        model_dir = with_chat_template(model_dir, workdir / "model-chat")
        data = prepare_chats(workdir / "chats.jsonl", vocab, _rows_needed(settings), settings.seq)
    else:
        data = prepare_data(workdir / "data.jsonl", vocab, _tokens_needed(settings))

    for mode in settings.modes:
        row = train_mode(mode, settings, model_dir, data, workdir)
        result["rows"] = [r for r in result["rows"] if _row_key(r) != _row_key(row)] + [row]
        result["rows"].sort(key=lambda r: (not r.get("fast_path", False), MODES.index(r["mode"])))
        result["summary"] = summarize(result["rows"])
        write_json(output, result)
        print(json.dumps(row), flush=True)
    write_json(output, result)
    print(format_table(result))
    print(f"results written to {output}")
    return result


def prepare_model(arch: str, folder: Path) -> Path:
    """The random-weight model folder of finechat bench train, plus a stand-in word-level tokenizer."""
    from finechat.bench.train import ARCHS, make_random_model

    make_random_model(arch, folder)
    if not (folder / "tokenizer.json").is_file():
        save_word_tokenizer(folder, ARCHS[arch]["vocab_size"])
    return folder


def prepare_data(path: Path, vocab_size: int, tokens: int) -> Path:
    """A .jsonl of documents of random words, at least `tokens` tokens in all (written once per size)."""
    words_per_doc = 1000
    docs = tokens // words_per_doc + 20  # + held-out documents
    marker = f"{vocab_size}:{docs}"
    if path.is_file() and path.with_suffix(".size").read_text() == marker:
        return path
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(docs):
            text = " ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(words_per_doc))
            f.write(json.dumps({"text": text}) + "\n")
    path.with_suffix(".size").write_text(marker)
    return path


def with_chat_template(model_dir: Path, folder: Path) -> Path:
    """folder: model_dir's files as links, and its word tokenizer with a chat template (CHAT_TEMPLATE) of its own, so
    that the shared model folder stays as `finechat bench generate` and `train` expect it."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for f in model_dir.iterdir():
        link = folder / f.name
        if f.is_file() and "token" not in f.name and not link.exists():
            link.symlink_to(f.resolve())
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def prepare_chats(path: Path, vocab_size: int, rows: int, seq: int) -> Path:
    """A .jsonl of `rows` chat records (plus held-out ones): a user and an assistant turn of 8 to seq / 2 random words
    each (written once per size)."""
    records = rows + 20
    marker = f"{vocab_size}:{records}:{seq}"
    if path.is_file() and path.with_suffix(".size").read_text() == marker:
        return path
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)

    def turn() -> str:
        return " ".join(f"w{rng.randrange(3, vocab_size)}" for _ in range(rng.randint(8, max(8, seq // 2))))

    with path.open("w") as f:
        for _ in range(records):
            messages = [{"role": "user", "content": turn()}, {"role": "assistant", "content": turn()}]
            f.write(json.dumps({"messages": messages}) + "\n")
    path.with_suffix(".size").write_text(marker)
    return path


def train_flags(settings: Settings, model_dir: Path, data: Path, run_dir: Path) -> list[str]:
    """The `finechat train` flags every mode shares."""
    dtype = "bfloat16" if settings.device == "cuda" else "float32"
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(run_dir),
        "--max-steps",
        str(settings.steps),
        "--batch-size",
        str(settings.batch_size),
        "--grad-accum",
        str(settings.grad_accum),
        "--max-seq-length",
        str(settings.seq),
        "--quantize",
        settings.quantize,
        "--compute-dtype",
        dtype,
        "--fast-path" if settings.fast_path else "--no-fast-path",
        "--offload-activations" if settings.offload else "--no-offload-activations",
        "--numa-binding" if settings.numa_binding else "--no-numa-binding",
        "--cuda-graphs" if settings.cuda_graphs else "--no-cuda-graphs",
        "--logging-steps",
        str(settings.logging_steps),
        "--optimizer",
        settings.optimizer,
        "--save-steps",
        # A checkpoint after the last step only where --resume-check needs one: an FSDP checkpoint of a 7B model
        # gathers the whole base to host memory several times, which is not what this measures.
        str(settings.steps if settings.resume_check else 10**6),
        "--eval-fraction",
        "0.02",
        "--max-eval-docs",
        "2",
    ]


def train_command(mode: str, settings: Settings, flags: list[str]) -> list[str]:
    """The command line of one mode: what a user types (torchrun directly on CPU, where --gpus refuses)."""
    from finechat import distributed

    finechat = [sys.executable, "-m", "finechat"]
    if mode == "single":
        return finechat + flags
    if settings.device == "cuda":
        return finechat + flags + ["--gpus", str(settings.gpus), "--distributed", mode]
    return distributed.launch_command(flags + ["--distributed", mode], settings.gpus)


def _numa_binds(settings: Settings) -> bool:
    """True when train's --numa-binding would pin the processes to fewer CPUs than they may use."""
    from finechat import distributed

    return settings.device == "cuda" and any(distributed.binding_cpus(g) for g in range(settings.gpus))


def train_mode(mode: str, settings: Settings, model_dir: Path, data: Path, workdir: Path) -> dict[str, Any]:
    """Run one mode to the end and read its numbers; a failed run gives a row with the error and its log's tail.
    With settings.resume_check, a finished ddp or fsdp run then resumes from its checkpoint for two more steps."""
    from finechat import distributed, runs

    gpus = 1 if mode == "single" else settings.gpus
    plan = distributed.Plan(mode, gpus)
    fast = settings.fast_path and mode != "fsdp"
    row: dict[str, Any] = {"mode": mode, "gpus": gpus, "tok_s": None, "peak_gib": None}
    row.update(batch_size=settings.batch_size, seq=settings.seq, fast_path=fast, logging_steps=settings.logging_steps)
    row["optimizer"] = distributed.optimizer(plan, settings.optimizer)  # as train() picks it
    if settings.optimizer != DEFAULT_OPTIMIZER:
        row["optimizer_ablation"] = settings.optimizer
    if not settings.offload:
        row["offload_ablation"] = "off"
    if settings.numa_binding:  # "no-op" where each GPU's NUMA node has every CPU (round 14's machine: one node)
        row["numa_ablation"] = "bound" if _numa_binds(settings) else "no-op"
    if settings.grad_accum > 1:
        row["grad_accum"] = settings.grad_accum
    if settings.chat:
        row["data"] = "chat"
    if not settings.cuda_graphs:
        row["graphs_ablation"] = "off"
    if mode == "fsdp" and settings.device != "cuda":
        return {**row, "error": "FSDP needs CUDA GPUs (skipped on CPU)"}
    name = mode if fast or mode == "fsdp" else f"{mode}-plain"
    if _ablation_name(row):
        name += f"-{_ablation_name(row)}"
    run_dir = workdir / "runs" / name
    trace = workdir / "trace" / name if settings.profile else None
    for folder in (run_dir, trace):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    flags = train_flags(settings, model_dir, data, run_dir)
    error = _launch(mode, settings, flags, workdir / f"{name}.log", trace)
    row["seconds"] = round(time.perf_counter() - t, 1)
    profiled = settings.steps if settings.profile else None
    row.update(read_metrics(run_dir, settings.warmup, profiled))
    if trace is not None:
        tokens_per_step = settings.batch_size * settings.grad_accum * settings.seq * gpus
        row.update(read_trace(trace, settings.warmup, profiled, tokens_per_step))
        if row.get("tok_s_from_mean_period"):
            # tok_s (the issue's field) is the step periods' mean, the measure every speed-up takes; the trainer's
            # logged rate spans --logging-steps steps from the last log, which with 10 is one window including the
            # warm-up (round 11: 6,736 logged against 9,554 from the periods), and stays beside it
            row["tok_s_logged"], row["tok_s"] = row["tok_s"], row["tok_s_from_mean_period"]
    if error:
        return {**row, "error": error}
    row["adapter_layout"] = adapter_layout(run_dir)  # before a resume check rewrites the adapter
    if settings.resume_check and mode != "single":
        more = settings.steps + 2
        flags = ["train", "--output", str(run_dir), "--resume", "--max-steps", str(more)]
        error = _launch(mode, settings, flags, workdir / f"{name}-resume.log")
        steps = [r["step"] for r in runs.read_metrics(run_dir) if "loss" in r]
        row["resume_ok"] = not error and steps == list(range(1, more + 1))
        if not row["resume_ok"]:
            row["resume_error"] = error or f"steps after --resume: {steps[-4:]}"
    return row


def _launch(mode: str, settings: Settings, flags: list[str], log_path: Path, trace: Path | None = None) -> str | None:
    """Run `finechat <flags>` the way the mode runs (traced into `trace`, profiling the last step); None when it
    exits 0, else what went wrong (log tail)."""
    from finechat import steptrace

    env = {**os.environ, **NCCL_ENV, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop(steptrace.TRACE_ENV, None)
    if trace is not None:
        env.update({steptrace.TRACE_ENV: str(trace), steptrace.PROFILE_STEP_ENV: str(settings.steps)})
    if settings.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    elif mode == "single":
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    command = train_command(mode, settings, flags)
    print(f"== {mode}: {' '.join(command[1:])}", flush=True)
    with log_path.open("w") as log:
        returncode = _run(command, env, log, settings.timeout_s)
    if returncode == 0:
        return None
    tail = log_path.read_text(errors="replace").splitlines()[-25:]
    print("\n".join(tail), file=sys.stderr, flush=True)
    reason = f"timed out after {settings.timeout_s} s" if returncode is None else f"exit code {returncode}"
    return f"{reason}; log {log_path}: " + " | ".join(line.strip() for line in tail if line.strip())[-2000:]


def _run(command: list[str], env: dict[str, str], log, timeout_s: int) -> int | None:
    """Exit code of command, or None when it ran past timeout_s and was stopped (with every process it started:
    torchrun passes SIGTERM on to its workers, which live in sessions of their own)."""
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return None


def read_metrics(run_dir: Path, warmup: int, profiled: int | None = None) -> dict[str, Any]:
    """tok_s (mean over logged steps after the warm-up, without the profiled step), peak_gib, steps done and last
    loss from a run folder."""
    from finechat import runs

    rows = [r for r in runs.read_metrics(run_dir) if "loss" in r]
    if not rows:
        return {}
    timed = [r for r in rows if r["step"] > warmup and r["step"] != profiled] or rows
    rates = [r["tokens_per_s"] for r in timed]
    peaks = [r["peak_gib"] for r in rows if r.get("peak_gib") is not None]
    return {
        "tok_s": round(sum(rates) / len(rates)),
        "peak_gib": max(peaks) if peaks else None,
        "steps": rows[-1]["step"],
        "timed_steps": len(timed),
        "loss": round(rows[-1]["loss"], 4),
    }


def read_trace(folder: Path, warmup: int, profiled: int | None, tokens_per_step: int) -> dict[str, Any]:
    """Per-rank step times after the warm-up (without the profiled step), their medians, the tokens/s those imply,
    and the profile summaries (rank 0 in full, every rank's totals)."""
    out: dict[str, Any] = {}
    step_s: dict[str, list[float]] = {}
    period_s: dict[str, list[float]] = {}
    stalls: dict[str, list[dict[str, float]]] = {}
    for path in sorted(folder.glob("step-times-rank*.json")):
        trace = json.loads(path.read_text())
        timed = [s for s in trace["steps"] if s["step"] > warmup and s["step"] != profiled]
        step_s[str(trace["rank"])] = [round(s["s"], 4) for s in timed]
        period_s[str(trace["rank"])] = [round(s["period"], 4) for s in timed]
        if timed:  # steps over twice the median: what else happened in them (garbage collection, cudaMalloc/Free)
            slow = 2 * _median([s["s"] for s in timed])
            stalls[str(trace["rank"])] = [
                {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()} for s in timed if s["s"] > slow
            ]
    if step_s:
        out["step_s"], out["period_s"] = step_s, period_s
        if any(stalls.values()):
            out["stalled_steps"] = stalls
        out["step_s_median"] = {rank: _median(times) for rank, times in step_s.items() if times}
        out["period_s_median"] = {rank: _median(times) for rank, times in period_s.items() if times}
        if period_s.get("0"):  # tokens/s from rank 0's step periods: the median, and the mean (stalls included)
            out["tok_s_from_period"] = round(tokens_per_step / _median(period_s["0"]))
            out["tok_s_from_mean_period"] = round(tokens_per_step * len(period_s["0"]) / sum(period_s["0"]))
    profiles = {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("profile-rank*.json"))}
    if profiles:
        out["profile"] = profiles.get("profile-rank0.json")
        keys = ("wall_ms", "gpu_ms", "gpu_ms_by_kind", "kernels", "host_waits")
        out["profile_by_rank"] = {str(p["rank"]): {k: p.get(k) for k in keys} for p in profiles.values()}
    return out


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return round(ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2, 4)


def _row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """Rows are kept per mode and path; an ablation's rows beside them (and out of the summary)."""
    key: tuple[Any, ...] = (row["mode"], bool(row.get("fast_path", False)))
    ablations = tuple(row[k] for k in ABLATIONS if row.get(k))
    return key + ablations if ablations else key


def _ablation_name(row: dict[str, Any]) -> str:
    """What sets an ablation's row apart, e.g. "optimizer_adamw_torch" ("" for the default's rows)."""
    return "_".join(f"{k.removesuffix('_ablation')}_{row[k]}" for k in ABLATIONS if row.get(k))


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets: DDP speed-up over one GPU on the same path (>= 1.8x on 2; fast path first), FSDP peak
    memory under one GPU's (the plain layers' single row first: FSDP runs those)."""
    by = {_row_key(r): r for r in rows}
    out: dict[str, Any] = {}
    for fast in (True, False):
        single, ddp = by.get(("single", fast)), by.get(("ddp", fast))
        if single and ddp and single.get("tok_s_from_period") and ddp.get("tok_s_from_period"):
            # The logged tokens/s spans --logging-steps steps from the last log (with 10, one window that includes
            # the warm-up): the step periods are the measure; the mean keeps every stall in, the median none.
            speedup = round(ddp["tok_s_from_mean_period"] / single["tok_s_from_mean_period"], 3)
            out[f"ddp_speedup_{'fast' if fast else 'plain'}_path"] = speedup
            out.setdefault("ddp_speedup", speedup)
            out.setdefault("ddp_speedup_median_step", round(ddp["tok_s_from_period"] / single["tok_s_from_period"], 3))
            out.setdefault("ddp_scaling_efficiency", round(speedup / ddp["gpus"], 3))
        elif single and ddp and single.get("tok_s") and ddp.get("tok_s"):
            speedup = round(ddp["tok_s"] / single["tok_s"], 3)
            out[f"ddp_speedup_{'fast' if fast else 'plain'}_path"] = speedup
            out.setdefault("ddp_speedup", speedup)
            out.setdefault("ddp_scaling_efficiency", round(speedup / ddp["gpus"], 3))
    for key, ddp in by.items():  # each ablation's own speed-up, beside (not instead of) the target's
        single = by.get(("single", *key[1:]))
        if len(key) > 2 and key[0] == "ddp" and single and single.get("tok_s_from_mean_period"):
            out[f"ddp_speedup_ablation_{_ablation_name(ddp)}"] = round(
                ddp["tok_s_from_mean_period"] / single["tok_s_from_mean_period"], 3
            )
    single = by.get(("single", False)) or by.get(("single", True))
    fsdp = by.get(("fsdp", False))
    if single and fsdp and single.get("peak_gib") and fsdp.get("peak_gib"):
        out["fsdp_peak_over_single"] = round(fsdp["peak_gib"] / single["peak_gib"], 3)
        out["fsdp_compared_with_fast_path"] = bool(single.get("fast_path"))
    if single and fsdp and single.get("tok_s") and fsdp.get("tok_s"):
        out["fsdp_speedup"] = round(fsdp["tok_s"] / single["tok_s"], 3)
    layouts = {r["adapter_layout"] for r in rows if r.get("adapter_layout")}
    if sum(1 for r in rows if r.get("adapter_layout")) > 1:
        out["adapters_alike"] = len(layouts) == 1  # same tensor names, shapes and dtypes in every mode
    return out


def adapter_layout(run_dir: Path) -> str | None:
    """A short digest of the saved adapter's tensor names, shapes and dtypes (None when there is none)."""
    from safetensors import safe_open

    path = run_dir / "adapter_model.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        names = sorted(f.keys())
        layout = [(k, f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in names]
    return hashlib.sha1(json.dumps(layout).encode()).hexdigest()[:12]


def format_table(result: dict[str, Any]) -> str:
    """The rows as a short table, the targets under it."""
    s = result["settings"]
    lines = [
        f"{result['device']}: {s['arch']}, {s['quantize']}, per-GPU batch {s['batch_size']}x{s['seq']}",
        f"{'mode':<8}{'path':>6}{'gpus':>5}{'tokens/s':>12}{'peak GiB/GPU':>14}{'step s by rank':>22}  note",
    ]
    for r in result["rows"]:
        rate = r.get("tok_s_from_mean_period") or r.get("tok_s")  # the step periods' mean, as the summary takes it
        tok = f"{rate:,}" if rate else "-"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "-"
        path = "fast" if r.get("fast_path") else "plain"
        steps = " ".join(f"{v:.3f}" for v in r.get("step_s_median", {}).values()) or "-"
        note = r.get("error", "")[:60] or _profile_note(r.get("profile"))
        stalls = max((len(v) for v in r.get("stalled_steps", {}).values()), default=0)
        note = f"{stalls} stalled step(s); {note}" if stalls else note
        note = f"optimizer {r['optimizer_ablation']} (ablation); {note}" if r.get("optimizer_ablation") else note
        note = f"activation offload off (ablation); {note}" if r.get("offload_ablation") else note
        note = f"NUMA-bound processes (ablation); {note}" if r.get("numa_ablation") else note
        note = f"{r['grad_accum']} micro-batches a step; {note}" if r.get("grad_accum") else note
        note = f"layer graphs off (ablation); {note}" if r.get("graphs_ablation") else note
        note = f"chat records; {note}" if r.get("data") == "chat" else note
        lines.append(f"{r['mode']:<8}{path:>6}{r['gpus']:>5}{tok:>12}{peak:>14}{steps:>22}  {note}")
    summary = result.get("summary", {})
    for fast in ("fast", "plain"):
        if f"ddp_speedup_{fast}_path" in summary:
            speedup = summary[f"ddp_speedup_{fast}_path"]
            lines.append(f"DDP speed-up, {fast} path: {speedup:.2f}x (target >= 1.8x on 2 GPUs)")
    for key, speedup in summary.items():
        if key.startswith("ddp_speedup_ablation_"):
            name = key.removeprefix("ddp_speedup_ablation_")
            what = (
                f"{name.removeprefix('grad_accum_')} micro-batches a step"
                if "grad_accum" in name
                else "ablation " + name
            )
            lines.append(f"DDP speed-up, {what}: {speedup:.2f}x")
    if "fsdp_peak_over_single" in summary:
        lines.append(f"FSDP peak memory {summary['fsdp_peak_over_single']:.2f} of one GPU's (target < 1)")
    if "adapters_alike" in summary:
        lines.append(f"adapters alike across modes (names, shapes, dtypes): {summary['adapters_alike']}")
    for r in result["rows"]:
        if "resume_ok" in r:
            lines.append(f"{r['mode']} --resume from its checkpoint: {'ok' if r['resume_ok'] else r['resume_error']}")
    return "\n".join(lines)


def _profile_note(profile: dict[str, Any] | None) -> str:
    """'profiled step 512 ms: GPU 480 ms (nccl 3 ms), 1,234 kernels, 2 host waits' from a profile summary."""
    if not profile:
        return ""
    if not profile.get("gpu"):
        return f"profiled step {profile['wall_ms']:.0f} ms (no GPU)"
    kinds = profile.get("gpu_ms_by_kind", {})
    waits = sum(w["count"] for w in profile.get("host_waits", {}).values())
    return (
        f"profiled step {profile['wall_ms']:.0f} ms: GPU {profile['gpu_ms']:.0f} ms (nccl {kinds.get('nccl', 0):.0f} ms),"
        f" {profile['kernels']:,} kernels, {waits} host waits"
    )


def card_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' -> 'cpu'."""
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", device.upper())
    return m[1].lower() if m else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def _tokens_needed(settings: Settings) -> int:
    return _rows_needed(settings) * settings.seq


def _rows_needed(settings: Settings) -> int:
    return settings.steps * settings.batch_size * settings.grad_accum * settings.gpus * 5 // 4


def _check(settings: Settings, archs: dict[str, Any]) -> None:
    if settings.arch not in archs:
        raise UserError(f"--arch {settings.arch}: expected one of {', '.join(archs)}")
    unknown = [m for m in settings.modes if m not in MODES]
    if unknown or not settings.modes:
        raise UserError(f"--modes: expected some of {', '.join(MODES)}, got {','.join(settings.modes)!r}")
    if settings.device not in ("cuda", "cpu"):
        raise UserError(f"--device must be cuda or cpu, got {settings.device!r}")
    if settings.device == "cpu" and settings.arch != "tiny":
        raise UserError(f"--arch {settings.arch} on CPU would take hours; use --arch tiny for a CPU dry run")
    if settings.gpus < 2 and any(m != "single" for m in settings.modes):
        raise UserError("--gpus must be 2 or more for the ddp and fsdp modes")
    if settings.steps <= settings.warmup + settings.profile:
        raise UserError(
            f"--steps ({settings.steps}) must be larger than --warmup ({settings.warmup})"
            + (" plus the profiled last step (or pass --no-profile)" if settings.profile else "")
        )
    if settings.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("no CUDA GPU here; use --arch tiny --device cpu for a dry run")


def _previous_rows(output: Path) -> list[dict[str, Any]]:
    try:
        previous = json.loads(output.read_text())
    except (OSError, ValueError):
        return []
    return previous.get("rows", []) if previous.get("kind") == "multigpu" else []


def main(argv: list[str] | None = None, prog: str = "python -m finechat.bench.multigpu") -> int:
    """Command line: python -m finechat.bench.multigpu [--arch tiny --device cpu] ..."""
    d = Settings()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=d.arch, help=f"random-weight model (default: {d.arch}; tiny for CPU)")
    p.add_argument("--gpus", type=int, default=d.gpus, help=f"GPUs (processes) of ddp and fsdp (default: {d.gpus})")
    p.add_argument("--modes", default=",".join(d.modes), help=f"what to measure (default: {','.join(d.modes)})")
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="sequences per GPU per micro-batch (default: 4)"
    )
    p.add_argument(
        "--grad-accum",
        type=int,
        default=d.grad_accum,
        help="micro-batches per optimizer step (default: 1); more gives rows of their own, beside the default's",
    )
    p.add_argument("--seq", type=int, default=d.seq, help=f"tokens per sequence (default: {d.seq})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps per mode (default: {d.steps})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"steps left out of tokens/s (default: {d.warmup})")
    p.add_argument("--quantize", choices=("nf4", "none"), default=d.quantize, help="base weights (default: nf4)")
    p.add_argument("--fast-path", action="store_true", help="finechat's fused layers in single and ddp (not fsdp)")
    p.add_argument("--no-profile", action="store_true", help="no step times, no profile of the last step")
    p.add_argument("--device", default=d.device, help="cuda, or cpu for a dry run with --arch tiny")
    p.add_argument("--workdir", default=d.workdir, help=f"data, run folders and logs (default: {d.workdir})")
    p.add_argument("--model-dir", help="folder for the random model (default: /tmp/finechat-bench-ARCH)")
    p.add_argument("--output", help="JSON path, or a folder for multigpu-CARD-DATE.json (default: benchmarks/results)")
    p.add_argument("--timeout", type=int, default=d.timeout_s, help=f"seconds per run (default: {d.timeout_s})")
    p.add_argument("--resume-check", action="store_true", help="then resume ddp and fsdp runs for two more steps")
    p.add_argument(
        "--logging-steps",
        type=int,
        default=d.logging_steps,
        help="log (and gather across processes) every N steps; tok_s then spans N steps, tok_s_from_period does not",
    )
    p.add_argument(
        "--optimizer",
        default=d.optimizer,
        help=f"the optimizer of every mode (default: {d.optimizer}); another one is measured as an ablation, its rows "
        "kept beside the default's",
    )
    p.add_argument(
        "--no-offload",
        action="store_true",
        help="the fast path without activation offloading in every mode, measured as an ablation (rows kept beside)",
    )
    p.add_argument(
        "--numa-binding",
        action="store_true",
        help="every process pinned to the CPUs of its GPU's NUMA node, measured as an ablation (rows kept beside)",
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="chat records of many lengths (padded batches of many shapes) instead of packed text (rows kept beside)",
    )
    p.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="the fast path without its layer graphs, measured as an ablation (rows kept beside)",
    )
    a = p.parse_args(argv)
    settings = Settings(
        arch=a.arch,
        gpus=a.gpus,
        modes=[m.strip() for m in a.modes.split(",") if m.strip()],
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        seq=a.seq,
        steps=a.steps,
        warmup=a.warmup,
        quantize=a.quantize,
        fast_path=a.fast_path,
        profile=not a.no_profile,
        device=a.device,
        workdir=a.workdir,
        model_dir=a.model_dir,
        output=a.output,
        timeout_s=a.timeout,
        resume_check=a.resume_check,
        logging_steps=a.logging_steps,
        optimizer=a.optimizer,
        offload=not a.no_offload,
        numa_binding=a.numa_binding,
        chat=a.chat,
        cuda_graphs=not a.no_cuda_graphs,
    )
    try:
        run(
            settings,
            command=f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:]),
        )
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
