"""`finechat bench train`: training tokens/s and peak GPU memory of the seed's QLoRA stack and of finechat's fast
path, on a random-weight model of a real architecture, measured one after the other in one process.

Both systems load the model the way a user's checkpoint is loaded (saved to a folder, then models.load_base with NF4
and double quantization), get LoRA on all seven projections and step with paged AdamW 32-bit on random token
batches: `warmup` steps, then `steps` timed steps, as ../shared/baselines/seed_stack.py measured the seed.
- seed: prepare_model_for_kbit_training (float32 upcast) + HF gradient checkpointing + peft, model(labels=...).loss.
- finechat: fastpath.prepare + peft with bf16 adapters (as SFTTrainer leaves them for a 4-bit base) and the
  chunked LM-head loss SFTTrainer computes (fastpath.causal_lm_loss).
- finechat-nodropout: the same with LoRA dropout 0 (Unsloth's fast path requires that).
- ablations (at --ablation-shapes): finechat with one part switched off, to measure what it buys:
  finechat-plainops (plain PyTorch RMSNorm/RoPE/SwiGLU instead of Liger's kernels), finechat-gpucheckpoints
  (checkpoints kept on the GPU instead of offloaded), finechat-norecompute (no activation checkpointing at all),
  finechat-bnbadamw (bitsandbytes' PagedAdamW32bit instead of finechat.optim's), finechat-unfuseddropout (the
  dropout mask written out and cuBLAS for the adapter products instead of the fused kernels), finechat-bnbdequant
  (bitsandbytes' dequantize_4bit instead of finechat's NF4 kernel), finechat-qkvapart (q, k and v as three LoRA
  functions, each with its own mask, decoding and GEMM, instead of one group), finechat-nographs (the layer
  forwards launched op by op instead of replayed as CUDA graphs, at batches of at most 4096 tokens),
  finechat-fullrecompute (the recompute computes the down projection's product too, which nothing reads),
  finechat-recomputeattention (the recompute computes each layer's attention half again, instead of taking it
  from the first pass, kept in host memory, at batches the layer graphs leave eager),
  finechat-eagerbackward (the layers' recomputes and backwards run by autograd op by op instead of replayed as CUDA
  graphs; only the forwards are graphed), finechat-paddingmask (with --padding: the batches' padding mask passed to
  the model, where `finechat train` leaves it out of right-padded batches; the seed stack always passes it).
With --pairs N each ablation is measured N times, each time right after finechat as it is on the same model, and
the JSON's "pairs" gives the median of the pairs' ratios: at the host-bound small shapes single rows of one call move
by 20-35% with nothing changed, and pairs cancel such drifts.
Every row has the mean step time (what tokens/s is computed from), the median and fastest step, and the main
thread's CPU time per step: when that is close to the step time, the step is bound by the host, not the GPU.
The longest-sequence probe trains single sequences on the finechat model under a memory cap (an 80 GB H100's
usable memory by default, also on an H200)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finechat.bench.common import device_name, free_memory, sync, versions, write_json
from finechat.errors import UserError

log = logging.getLogger(__name__)

_MISTRAL_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rope_theta=1e6,
    sliding_window=None,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
ARCHS: dict[str, dict[str, Any]] = {
    "mistral-7b": _MISTRAL_7B,  # Mistral-7B-Instruct-v0.2's shape
    "mistral-7b-2l": {**_MISTRAL_7B, "num_hidden_layers": 2},  # real widths, two layers: a quick check at size
    "tiny": {  # CPU dry runs and tests
        **_MISTRAL_7B,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    },
}
SYSTEMS = ("finechat", "finechat-nodropout", "seed")
ABLATIONS = (
    "finechat-plainops",
    "finechat-gpucheckpoints",
    "finechat-norecompute",
    "finechat-bnbadamw",
    "finechat-unfuseddropout",
    "finechat-bnbdequant",
    "finechat-qkvapart",
    "finechat-nographs",
    "finechat-fullrecompute",
    "finechat-recomputeattention",
    "finechat-eagerbackward",
    "finechat-paddingmask",
)
DEFAULT_SHAPES = "4x512,1x2048,8x1024,1x8192,2x4096"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_PARAMS_7B = 7.24e9  # for the 6N FLOP/token utilisation figure, as in the baselines


@dataclass
class BenchSettings:
    """What `finechat bench train` measures; each field is a flag of the command."""

    arch: str = "mistral-7b"
    shapes: list[tuple[int, int]] = field(default_factory=lambda: parse_shapes(DEFAULT_SHAPES))
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    steps: int = 5
    warmup: int = 2
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    longest: list[int] = field(default_factory=list)  # single-sequence lengths to try on the finechat model
    ablation_shapes: list[tuple[int, int]] = field(default_factory=list)  # where to measure the ABLATIONS
    pairs: int = 0  # >0: each ablation measured this many times, each right after finechat as it is (see _paired)
    profile_shapes: list[tuple[int, int]] = field(default_factory=list)  # one profiled finechat step each
    # >0: batches right-padded as chat records are, this fraction of their tokens padding on average (see _batch)
    padding: float = 0.0
    memory_cap_gib: float | None = 79.0  # process memory cap (an 80 GB H100 has 79.2 GiB); None: the whole card
    model_dir: str | None = None  # where the random model is saved (default /tmp/finechat-bench-<arch>)
    output: str | None = None  # JSON path (default benchmarks/results/train-<card>-<date>.json)


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4x512,1x2048' -> [(4, 512), (1, 2048)]."""
    shapes = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+)\s*", part)
        if not m or int(m[1]) <= 0 or int(m[2]) < 2:
            raise UserError(f"--shapes {text}: expected BATCHxSEQ pairs like 4x512,1x2048")
        shapes.append((int(m[1]), int(m[2])))
    return shapes


def parse_lengths(text: str) -> list[int]:
    """'65536,131072' -> [65536, 131072]; '' -> []."""
    try:
        lengths = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        lengths = [0]
    if any(n < 2 for n in lengths):
        raise UserError(f"--longest {text}: expected sequence lengths like 65536,131072")
    return lengths


def run(settings: BenchSettings, command: str = "finechat bench train") -> dict[str, Any]:
    """Measure every system at every shape (and the longest-sequence probe); print a table, write and return JSON."""

    if settings.arch not in ARCHS:
        raise UserError(f"--arch {settings.arch}: expected one of {', '.join(ARCHS)}")
    unknown = [s for s in settings.systems if s not in SYSTEMS + ABLATIONS]
    if unknown:
        raise UserError(f"--systems: unknown {unknown[0]!r}; expected some of {', '.join(SYSTEMS + ABLATIONS)}")
    device = device_name(settings.arch)
    cuda = device != "cpu"
    result: dict[str, Any] = {
        "kind": "train",
        "device": device,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "arch": settings.arch,
        "settings": {**asdict(settings), "shapes": [f"{b}x{s}" for b, s in settings.shapes]},
        "software": versions(("torch", "transformers", "peft", "trl", "bitsandbytes", "liger-kernel", "triton")),
        "fast_path_kernels": _kernels(),
        "rows": [],
    }
    output = Path(settings.output or f"benchmarks/results/train-{_card(device)}-{result['date'][:10]}.json")
    if cuda:
        result["memory_cap_gib"] = _cap_memory(settings.memory_cap_gib)
        result["matmul_tflops"] = _matmul_tflops()
    path = make_random_model(settings.arch, Path(settings.model_dir or f"/tmp/finechat-bench-{settings.arch}"))

    def record(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        result["fast_path_kernels"] = _kernels()  # a kernel that fell back during the row shows its fallback
        write_json(output, result)  # after every row: a crash later keeps what was measured

    # finechat first: it is the likelier to fail, and then the slow seed runs need not be spent. The seed next, so a
    # run cut short still has both at every shape; the extras last, on a fresh finechat model (loading takes seconds).
    for system, build in (("finechat", _finechat), ("seed", _seed)):
        if system in settings.systems:
            model, step = build(path, settings)
            for bs, seq in settings.shapes:
                record(_with_graphs(model, system, step, bs, seq, settings, model.config.vocab_size))
            del model, step
            free_memory()
    extras = [s for s in ABLATIONS if s in settings.systems]
    if settings.longest or extras or settings.profile_shapes or "finechat-nodropout" in settings.systems:
        model, step = _finechat(path, settings)
        vocab = model.config.vocab_size
        for seq in settings.longest:
            record({**_measure("finechat", step, 1, seq, settings, vocab, steps=1, warmup=0), "probe": "longest"})
        for system in extras:
            for bs, seq in settings.ablation_shapes or settings.shapes:
                for pair in range(max(1, settings.pairs)):
                    if settings.pairs:  # finechat as it is, right before the ablation: a pair for _paired
                        row = _with_graphs(model, "finechat", step, bs, seq, settings, vocab)
                        record({**row, "paired_with": system, "pair": pair})
                    _ablate(model, step, system, True)
                    row = {**_with_graphs(model, system, step, bs, seq, settings, vocab), "ablation": True}
                    record({**row, "pair": pair} if settings.pairs else row)
                    _ablate(model, step, system, False)
        if settings.pairs:
            result["pairs"] = _paired(result["rows"])
        for bs, seq in settings.profile_shapes:
            result.setdefault("profiles", {})[f"{bs}x{seq}"] = _profile(step, bs, seq, vocab, output)
        if "finechat-nodropout" in settings.systems:
            _set_lora_dropout(model, 0.0)
            for bs, seq in settings.shapes:
                row = _with_graphs(model, "finechat-nodropout", step, bs, seq, settings, vocab)
                record({**row, "lora_dropout": 0.0})
        del model, step
        free_memory()

    result["longest_sequence"] = _longest_summary(result["rows"], result.get("memory_cap_gib"))
    write_json(output, result)
    print(format_table(result))
    print(f"results written to {output}")
    return result


def make_random_model(arch: str, folder: Path) -> Path:
    """Save a random-weight bf16 model of the architecture (built on the GPU when there is one) to folder, once."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    marker = folder / "finechat-bench-arch.json"
    if marker.is_file() and json.loads(marker.read_text()) == ARCHS[arch]:
        return folder
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(MistralConfig(**ARCHS[arch]), dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    marker.write_text(json.dumps(ARCHS[arch]))
    del model
    free_memory()
    log.info("random %s saved to %s in %.0f s", arch, folder, time.perf_counter() - t)
    return folder


def _lora_config(settings: BenchSettings, dropout: float):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=TARGETS,
    )


def _load(path: Path):
    import torch

    from finechat import models

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    t = time.perf_counter()
    model = models.load_base(str(path), quantize="nf4", compute_dtype=dtype, double_quant=True)
    log.info("loaded and quantized in %.0f s", time.perf_counter() - t)
    return model


def _bnb_optimizer(model):
    """The seed's optimizer: bitsandbytes' paged AdamW with 32-bit states."""
    import bitsandbytes as bnb

    return bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)


def _finechat_optimizer(model):
    """finechat's: the same update and states without a device wait per tensor (finechat.optim)."""
    from finechat.optim import PagedAdamW32bit

    return PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)


class _Step:
    """One training step on a batch of token ids (and, for padded batches, their labels with the pads ignored and
    their attention mask): loss, backward, optimizer step, gradients dropped. The mask reaches the model only with
    keep_mask (the seed stack; finechat as `finechat train` runs it leaves it out, finechat.trainer)."""

    def __init__(self, loss, optimizer, keep_mask: bool = False) -> None:
        self.loss = loss  # (ids, labels, mask or None) -> loss
        self.optimizer = optimizer  # replaced by the finechat-bnbadamw ablation
        self.keep_mask = keep_mask  # switched on by the finechat-paddingmask ablation

    def __call__(self, ids, labels=None, mask=None):
        loss = self.loss(ids, ids if labels is None else labels, mask if self.keep_mask else None)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def _seed(path: Path, settings: BenchSettings):
    """The seed's stack exactly as ../shared/baselines/seed_stack.py measured it (UPCAST=1)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = _load(path)
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, _lora_config(settings, settings.lora_dropout))
    model.train()

    def loss(ids, labels, mask):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    return model, _Step(loss, _bnb_optimizer(model), keep_mask=True)


def _finechat(path: Path, settings: BenchSettings):
    """finechat's training path as `finechat train` builds it on CUDA, with the trainer's loop reduced to its step."""
    from peft import get_peft_model

    from finechat import fastpath

    model = _load(path)
    model = fastpath.prepare(model, gradient_checkpointing=True, require_cuda=False)
    model = get_peft_model(model, _lora_config(settings, settings.lora_dropout))
    dtype = next(p for p in model.parameters() if p.dtype.is_floating_point).dtype
    for param in model.parameters():
        if param.requires_grad:  # SFTTrainer keeps QLoRA adapters in the compute dtype (bf16)
            param.data = param.data.to(dtype)
    model.train()

    def loss(ids, labels, mask):
        return fastpath.causal_lm_loss(model, ids, labels, mask)

    return model, _Step(loss, _finechat_optimizer(model))


def _paired(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per ablation and shape, over its pairs (finechat as it is, then the ablation, one right after the other on
    one model): the median tokens/s of each and the median of the pairs' ratios, i.e. what the part switched off
    buys. Pairs cancel the host's slow drifts, which move single small-shape rows by 20-35% within one call."""
    base = {(r["paired_with"], r["shape"], r["pair"]): r for r in rows if r.get("paired_with") and r.get("tok_s")}
    groups: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for r in rows:
        key = (r["system"], r["shape"], r.get("pair"))
        if r.get("ablation") and r.get("pair") is not None and r.get("tok_s") and key in base:
            groups.setdefault(key[:2], []).append((base[key]["tok_s"], r["tok_s"]))
    return [
        {
            "system": system,
            "shape": shape,
            "pairs": len(pairs),
            "finechat_tok_s_median": round(statistics.median(f for f, _ in pairs)),
            "ablation_tok_s_median": round(statistics.median(a for _, a in pairs)),
            "gain_median": round(statistics.median(f / a - 1 for f, a in pairs), 3),
            "gains": [round(f / a - 1, 3) for f, a in pairs],
        }
        for (system, shape), pairs in groups.items()
    ]


def _with_graphs(model, system: str, step, bs: int, seq: int, settings: BenchSettings, vocab: int) -> dict[str, Any]:
    """_measure(...) on a finechat model whose layer graphs start empty (each shape captures its own during warm-up,
    and none holds memory from an earlier shape), with the number it captured and why capturing failed, if it did;
    a seed model's row as it is."""
    from finechat import fastpath

    graphs = fastpath.layer_graphs(model)
    if graphs is None:
        return _measure(system, step, bs, seq, settings, vocab)
    graphs.clear()
    offloader = fastpath.offloader(model)
    kept_before = offloader.kept_calls if offloader is not None else 0
    row = _measure(system, step, bs, seq, settings, vocab)
    if offloader is not None:  # layers a step that kept their attention half (finechat.offload.Kept)
        row["kept_attention_layers"] = round((offloader.kept_calls - kept_before) / (settings.warmup + settings.steps))
    row["layer_graphs"] = graphs.captured()
    if graphs.backward_enabled:
        row["layer_backward_graphs"] = graphs.captured_backward()
    if graphs.failed_backward:
        row["layer_backward_graphs_failed"] = graphs.failed_backward
    if graphs.failed:
        row["layer_graphs_failed"] = graphs.failed
    graphs.clear()
    return row


def _ablate(model, step: _Step, system: str, on: bool) -> None:
    """Switch off (on=True) or back on the part of the fast path that an ablation system leaves out."""
    from finechat import fastpath, kernels
    from finechat.kernels import dropout, lora_linear, nf4

    if system == "finechat-plainops":
        kernels.ENABLED["liger"] = not on
    elif system == "finechat-gpucheckpoints":
        fastpath.set_options(model, offload=not on)
    elif system == "finechat-norecompute":
        fastpath.set_options(model, gradient_checkpointing=not on)
    elif system == "finechat-bnbadamw":
        step.optimizer = _bnb_optimizer(model) if on else _finechat_optimizer(model)
    elif system == "finechat-unfuseddropout":
        dropout.ENABLED["fused"] = not on
    elif system == "finechat-bnbdequant":
        nf4.ENABLED["fused"] = not on
    elif system == "finechat-qkvapart":
        lora_linear.ENABLED["groups"] = not on
    elif system == "finechat-nographs":
        fastpath.set_options(model, cuda_graphs=not on)
    elif system == "finechat-fullrecompute":
        fastpath.ENABLED["skip_last_product"] = not on  # read at each recompute (each row starts without graphs)
    elif system == "finechat-recomputeattention":
        fastpath.set_options(model, keep_attention=not on)
    elif system == "finechat-eagerbackward":
        fastpath.set_options(model, cuda_graph_backward=not on)
    elif system == "finechat-paddingmask":
        step.keep_mask = on


def _profile(step, bs: int, seq: int, vocab: int, output: Path) -> dict[str, Any]:
    """One finechat step under torch.profiler: GPU time per kind of kernel against the step's wall time; the
    kernel table and the host-time table go to <output>-profile-<shape>.txt."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return {}
    free_memory()
    ids = torch.randint(0, vocab, (bs, seq), device="cuda")
    for _ in range(2):  # the first step runs the layers eagerly, the second captures their graphs (small batches)
        step(ids)
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        step(ids)
        sync()
        wall = time.perf_counter() - t
    # Kernels only: an operator's row repeats the time of the kernels it launched (the first run counted both).
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    buckets: dict[str, float] = {}
    for e in kernels:
        buckets[_kernel_kind(e.key)] = buckets.get(_kernel_kind(e.key), 0.0) + e.self_device_time_total / 1e3
    averages = prof.key_averages()
    table = averages.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=90)
    # the host's side too: at the small shapes the step waits for Python and launches, not for the GPU
    host = averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90)
    path = output.with_name(f"{output.stem}-profile-{bs}x{seq}.txt")
    path.write_text(f"{table}\n\nBy host (self CPU) time:\n{host}")
    summary = {
        "wall_ms_profiled": round(wall * 1e3, 1),
        "gpu_ms": round(sum(v for k, v in buckets.items() if k != "copy host<->gpu"), 1),  # copies: side stream
        "gpu_ms_by_kind": {k: round(v, 1) for k, v in sorted(buckets.items(), key=lambda kv: -kv[1])},
    }
    print(f"profile {bs}x{seq}: {json.dumps(summary)}", flush=True)
    return summary


def _kernel_kind(name: str) -> str:
    n = name.lower()
    kinds = [
        ("flash/attention", ("flash", "fmha", "attention")),
        ("nf4 dequant", ("dequantize", "kdequant")),
        ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90", "cublas", "splitk")),
        ("liger/triton", ("_rms_norm", "_triton_rope", "_swiglu", "liger")),
        ("lm head (trl)", ("_forward_kernel", "_backward_kernel")),
        ("copy host<->gpu", ("memcpy htod", "memcpy dtoh", "memcpyhtod", "memcpydtoh")),
        ("dropout (fused with lora A)", ("bernoulli", "philox", "uniform", "masked", "lora_a", "lora_dx")),
        ("optimizer", ("optimizer", "adam")),
        ("memset/copy", ("memset", "memcpy", "copy")),
        ("elementwise", ("elementwise", "vectorized", "reduce", "unrolled")),
    ]
    for kind, keys in kinds:
        if any(k in n for k in keys):
            return kind
    return "other"


def _set_lora_dropout(model, p: float) -> None:
    from torch import nn

    for name, module in model.named_modules():
        if ".lora_dropout." in f"{name}." and isinstance(module, nn.Dropout):
            module.p = p


def _measure(system: str, step, bs: int, seq: int, settings: BenchSettings, vocab: int, **kw: int) -> dict[str, Any]:
    import torch

    steps, warmup = kw.get("steps", settings.steps), kw.get("warmup", settings.warmup)
    cuda = torch.cuda.is_available()
    free_memory()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    row: dict[str, Any] = {"system": system, "shape": f"{bs}x{seq}"}
    try:
        ids, labels, mask = _batch(bs, seq, vocab, settings.padding, "cuda" if cuda else "cpu")
        for _ in range(warmup):
            step(ids, labels, mask)
        sync()
        marks = _StepMarks(cuda)
        t, cpu, all_cpu = time.perf_counter(), time.thread_time(), time.process_time()
        for _ in range(steps):
            loss = step(ids, labels, mask)
            marks.mark()
        sync()
        step_s = (time.perf_counter() - t) / steps
        host_s = (time.thread_time() - cpu) / steps
        process_s = (time.process_time() - all_cpu) / steps
        step_ms = sorted(marks.elapsed_ms())
        tok_s = bs * seq / step_s
        row.update(
            tok_s=round(tok_s),
            peak_gib=_gib(torch.cuda.max_memory_allocated()) if cuda else None,
            step_s=round(step_s, 3),
            step_ms_median=round(step_ms[len(step_ms) // 2], 1),
            step_ms_min=round(step_ms[0], 1),
            # CPU time per step of the main thread, and of every thread: on CUDA, PyTorch's autograd runs the
            # backward pass on a thread of its own per device, so the main thread alone misses it
            host_cpu_s=round(host_s, 3),
            process_cpu_s=round(process_s, 3),
            mfu_6N=round(tok_s * 6 * N_PARAMS_7B / 790e12, 3),
            peak_reserved_gib=_gib(torch.cuda.max_memory_reserved()) if cuda else None,
            loss=round(float(loss), 3),
        )
    except torch.OutOfMemoryError:
        row.update(tok_s=None, peak_gib=_gib(torch.cuda.max_memory_allocated()) if cuda else None, error="OOM")
    except Exception as e:  # record and go on: the other shapes and systems still measure
        log.exception("%s %dx%d failed", system, bs, seq)
        row.update(tok_s=None, peak_gib=None, error=f"{type(e).__name__}: {str(e)[:300]}")
    return row


def _batch(bs: int, seq: int, vocab: int, padding: float, device: str) -> tuple[Any, Any, Any]:
    """Random token ids, their labels and attention mask. With padding > 0 the rows are right-padded as TRL pads
    chat records, each to its own length: row i of bs keeps seq * (1 - 2 * padding * i / (bs - 1)) tokens (one row:
    seq * (1 - padding)), padding on average; the pads' labels are -100."""
    import torch

    ids = torch.randint(0, vocab, (bs, seq), device=device)
    if padding <= 0:
        return ids, ids, None
    shares = [2 * padding * i / (bs - 1) for i in range(bs)] if bs > 1 else [padding]
    lengths = torch.tensor([max(1, round(seq * (1 - share))) for share in shares], device=device)
    mask = (torch.arange(seq, device=device)[None, :] < lengths[:, None]).long()
    return ids, ids.masked_fill(mask == 0, -100), mask


class _StepMarks:
    """Step boundaries on the GPU's timeline (CUDA events, no waiting between steps) or the host's clock."""

    def __init__(self, cuda: bool) -> None:
        import torch

        self._event = (lambda: torch.cuda.Event(enable_timing=True)) if cuda else None
        self._marks: list[Any] = []
        self.mark()

    def mark(self) -> None:
        if self._event is None:
            self._marks.append(time.perf_counter())
        else:
            event = self._event()
            event.record()
            self._marks.append(event)

    def elapsed_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (call after synchronizing)."""
        pairs = zip(self._marks, self._marks[1:], strict=False)
        if self._event is None:
            return [(b - a) * 1e3 for a, b in pairs]
        return [a.elapsed_time(b) for a, b in pairs]


def _longest_summary(rows: list[dict[str, Any]], cap: float | None) -> dict[str, Any] | None:
    """Largest probed single sequence that trained, and a linear memory extrapolation of where the cap is reached."""
    singles = [
        (int(r["shape"].split("x")[1]), r["peak_gib"])
        for r in rows
        if r["system"] == "finechat"
        and r["shape"].startswith("1x")
        and r.get("tok_s")
        and r.get("peak_gib")
        and not r.get("paired_with")
    ]
    probed = [r for r in rows if r.get("probe") == "longest"]
    if not probed:
        return None
    fits = max((int(r["shape"].split("x")[1]) for r in probed if r.get("tok_s")), default=None)
    summary: dict[str, Any] = {"largest_trained": fits, "memory_cap_gib": cap}
    if len(singles) >= 2 and cap:
        (s0, m0), (s1, m1) = min(singles), max(singles)
        if s1 > s0 and m1 > m0:
            per_token = (m1 - m0) / (s1 - s0)
            summary["estimated_limit_tokens"] = int(s1 + (cap - m1) / per_token) // 1024 * 1024
            summary["gib_per_1k_tokens"] = round(per_token * 1024, 4)
    return summary


def format_table(result: dict[str, Any]) -> str:
    """The rows as a table: each system's tokens/s (peak GiB) per shape, and finechat over seed."""
    rows = [r for r in result["rows"] if not r.get("paired_with")]  # pairs' finechat rows: in the lines below
    shapes = list(dict.fromkeys(r["shape"] for r in rows if not r.get("probe")))
    systems = [s for s in SYSTEMS + ABLATIONS if any(r["system"] == s and not r.get("probe") for r in rows)]
    cell = {(r["system"], r["shape"]): r for r in rows if not r.get("probe")}  # an ablation's last pair

    def fmt(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        if not r.get("tok_s"):
            return r.get("error", "failed")[:20]
        mem = f" ({r['peak_gib']:.2f})" if r.get("peak_gib") is not None else ""
        return f"{r['tok_s']:,}{mem}"

    head = ["bs x seq"] + [f"{s} tok/s (GiB)" for s in systems]
    ratio = "finechat" in systems and "seed" in systems
    if ratio:
        head += ["speed-up", "memory"]
    lines = [f"{result['device']}, {result['arch']}", " | ".join(head)]
    for shape in shapes:
        cols = [shape] + [fmt(cell.get((s, shape))) for s in systems]
        if ratio:
            f, s = cell.get(("finechat", shape)), cell.get(("seed", shape))
            ok = f and s and f.get("tok_s") and s.get("tok_s")
            cols.append(f"{f['tok_s'] / s['tok_s']:.2f}x" if ok else "-")  # type: ignore[index]
            ok_mem = ok and f.get("peak_gib") and s.get("peak_gib")  # type: ignore[union-attr]
            cols.append(f"{f['peak_gib'] / s['peak_gib']:.2f}x" if ok_mem else "-")  # type: ignore[index]
        lines.append(" | ".join(cols))
    for r in rows:
        if r.get("probe"):
            lines.append(f"longest-sequence probe {r['shape']}: {fmt(r)}")
    for p in result.get("pairs", []):
        lines.append(
            f"pairs at {p['shape']}: {p['system']} {p['ablation_tok_s_median']:,} against finechat "
            f"{p['finechat_tok_s_median']:,} tok/s (medians of {p['pairs']}): the part it switches "
            f"off buys {p['gain_median']:+.1%} (median of the pairs' ratios)"
        )
    summary = result.get("longest_sequence")
    if summary:
        lines.append(f"longest single sequence: {json.dumps(summary)}")
    return "\n".join(lines)


def _kernels() -> dict[str, str]:
    """Which implementation each fused operation of the fast path uses in this process (a kernel that failed its
    first-use check shows here as its fallback)."""
    import torch

    from finechat.kernels import dropout, liger_ops, nf4

    cuda = torch.cuda.is_available()
    return {
        "rms_norm_rope_swiglu": "liger" if cuda and liger_ops() is not None else "reference (plain PyTorch)",
        "lora_dropout": (
            "torch bernoulli"
            if not (cuda and dropout._kernels() is not None)
            else f"triton (philox 4x, unfused: {dropout._BROKEN['fused']})"
            if dropout._BROKEN["fused"]
            else "triton (philox 4x, fused)"
        ),
        "nf4_dequantize": "triton" if cuda and nf4._kernel() is not None else "bitsandbytes",
    }


def _card(device: str) -> str:
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", device.upper())
    return m[1].lower() if m else re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def _cap_memory(cap_gib: float | None) -> float:
    """Limit this process to cap_gib of the card (no effect when the card is smaller); returns the limit in GiB."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    if cap_gib and cap_gib * 2**30 < total:
        torch.cuda.set_per_process_memory_fraction(cap_gib * 2**30 / total)
        return cap_gib
    return _gib(total)


def _matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return round(10 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12)


def _gib(n: int) -> float:
    return round(n / 2**30, 2)
