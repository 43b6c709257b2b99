"""Typed training configuration: defaults, YAML presets and command-line overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finechat.errors import UserError

QUANTIZE_CHOICES = ("nf4", "none")
PRESETS = Path(__file__).parent / "configs"  # also reachable as configs/ at the repository root
DTYPE_CHOICES = ("bfloat16", "float16", "float32", "auto")
DISTRIBUTED_CHOICES = ("auto", "ddp", "fsdp")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a one-line help text (shown by `finechat train --help`)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as config.yaml in the run folder."""

    model: str = _f("smollm2", "base model: Hub id, local HF folder, .gguf file, run folder, or the alias smollm2")
    data: str = _f("wiki-offline", "training data: Hub dataset name[:config], .txt/.jsonl/.json/.parquet, wiki-offline")
    eval_data: str | None = _f(None, "held-out data (same forms as data); default: a held-out slice of data")
    eval_fraction: float = _f(0.02, "fraction of documents held out for evaluation when eval_data is not given")
    run_dir: str = _f(
        "runs/finechat", "run folder to write (adapter, tokenizer, config, metrics, checkpoints)", flag="output"
    )
    max_steps: int = _f(-1, "optimizer steps to run; -1 means run num_epochs epochs")
    num_epochs: float = _f(1.0, "epochs over the training data when max_steps is -1", flag="epochs")
    learning_rate: float = _f(2e-4, "peak learning rate", flag="lr")
    lr_scheduler: str = _f("constant", "learning-rate schedule (any transformers scheduler name)")
    warmup_steps: int = _f(0, "linear warm-up steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    batch_size: int = _f(4, "sequences per device per micro-batch")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_seq_length: int = _f(512, "tokens per training sequence (text is packed into blocks of this length)")
    packing: bool = _f(
        False,
        "pack chat records several to a row (TRL's best-fit-decreasing packing) instead of padding each batch to "
        "its longest record; each record attends only to itself (on CUDA through flash attention's variable-length "
        "kernel). Text is packed into blocks either way",
    )
    max_train_docs: int = _f(0, "use at most this many training documents; 0 means all")
    max_eval_docs: int = _f(0, "use at most this many held-out documents; 0 means all")
    quantize: str = _f("nf4", "base weights: nf4 (QLoRA, bitsandbytes 4-bit) or none (full precision LoRA)")
    double_quant: bool = _f(True, "nested (double) quantization of the NF4 scales")
    compute_dtype: str = _f(
        "bfloat16", "dtype of 4-bit matmuls and of the full-precision base: " + "|".join(DTYPE_CHOICES)
    )
    lora_rank: int = _f(16, "LoRA rank r", flag="lora-r")
    lora_alpha: int = _f(32, "LoRA alpha (scale = alpha / rank)")
    lora_dropout: float = _f(0.05, "dropout on the LoRA input")
    lora_targets: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "module names that get LoRA"
    )
    gradient_checkpointing: bool = _f(True, "recompute activations in backward to save memory")
    optimizer: str = _f("paged_adamw_32bit", "optimizer name (transformers OptimizerNames)")
    seed: int = _f(42, "random seed for LoRA init, data order and dropout")
    logging_steps: int = _f(1, "write a metrics line every N steps")
    eval_steps: int = _f(0, "evaluate every N steps during training; 0 means only at the end")
    save_steps: int = _f(50, "write a checkpoint every N steps")
    save_total_limit: int = _f(2, "checkpoints to keep (oldest are removed)")
    fast_path: bool = _f(True, "use finechat's fast training path on CUDA (no effect on CPU)")
    offload_activations: bool = _f(
        True,
        "with gradient checkpointing, on the fast path or under FSDP: keep each layer's saved input in host memory, "
        "not on the GPU",
    )
    cuda_graphs: bool = _f(
        True,
        "on the fast path with gradient checkpointing: replay each layer's forward as a CUDA graph when a batch has "
        "at most 4096 tokens, where launching its kernels one by one takes the host longer than the GPU takes to run "
        "them",
    )
    cuda_graph_backward: bool = _f(
        True,
        "with cuda_graphs: replay each layer's recompute and backward as a CUDA graph too (on an H200, Mistral-7B at "
        "4x512 and 1x2048 tokens: 1.7-1.8x the steps with an eager backward)",
    )
    cuda_graph_shapes: int = _f(
        32,
        "with cuda_graphs: the most batch shapes whose graphs are kept; batches of other shapes run eagerly (chat "
        "records come in one shape per 64 tokens of padded length; on an H200, Mistral-7B's graphs of 16 shapes up to "
        "4x1024 tokens took 0.4 GiB allocated and 1.5 GiB reserved)",
    )
    keep_attention: bool = _f(
        True,
        "on the fast path with offloaded checkpoints, at batches of more than 4096 tokens: keep each layer's "
        "attention (rotated q and k, v, its output, the hidden state after it) from the forward in pinned host memory "
        "instead of recomputing it in backward, where every layer's fits in a quarter of the machine's memory (on an "
        "H200, Mistral-7B at 8x1024 tokens: 9 GiB pinned, +7.8% tokens/s)",
    )
    numa_binding: bool = _f(
        False,
        "with several GPUs: pin each process to the CPUs of its GPU's NUMA node, as torchrun --numa-binding=node does "
        "(no effect with one process, or where the GPU's CPUs are all of them)",
    )
    push_to_hub: str | None = _f(None, "Hub repo id to upload the adapter to after training")
    distributed: str = _f(
        "auto",
        "with several processes (--gpus, torchrun): ddp, fsdp (sharded QLoRA, CUDA), or auto (FSDP when the base "
        "weights would fill half a GPU, else DDP)",
    )

    def validate(self) -> TrainConfig:
        """Raise UserError for values that cannot work, naming the flag to change."""
        positive = [
            "batch_size",
            "grad_accum",
            "max_seq_length",
            "lora_rank",
            "lora_alpha",
            "logging_steps",
            "save_steps",
            "cuda_graph_shapes",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"--{flag_for(name)} must be a positive number, got {getattr(self, name)}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise UserError(f"--max-steps must be a positive number (or -1 for epochs), got {self.max_steps}")
        if self.max_steps == -1 and self.num_epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.num_epochs}")
        if self.learning_rate <= 0:
            raise UserError(f"--lr must be positive, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 < self.eval_fraction < 1:
            raise UserError(f"--eval-fraction must be between 0 and 1, got {self.eval_fraction}")
        for name in ("eval_steps", "max_train_docs", "max_eval_docs", "warmup_steps", "save_total_limit"):
            if getattr(self, name) < 0:
                raise UserError(f"--{flag_for(name)} must not be negative, got {getattr(self, name)}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise UserError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {self.quantize!r}")
        if self.compute_dtype not in DTYPE_CHOICES:
            raise UserError(f"--compute-dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.compute_dtype!r}")
        if self.distributed not in DISTRIBUTED_CHOICES:
            raise UserError(f"--distributed must be one of {', '.join(DISTRIBUTED_CHOICES)}, got {self.distributed!r}")
        if not self.lora_targets:
            raise UserError("--lora-targets must name at least one module, e.g. q_proj,v_proj")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields, for YAML."""
        return dataclasses.asdict(self)


def fields() -> list[dataclasses.Field]:
    """The TrainConfig fields, in declaration order."""
    return list(dataclasses.fields(TrainConfig))


def flag_for(name: str) -> str:
    """The command-line flag (without --) for a config field."""
    f = next(f for f in fields() if f.name == name)
    return f.metadata.get("flag", name.replace("_", "-"))


def field_type(f: dataclasses.Field) -> type:
    """The scalar Python type of a field (unwrapping Optional and list)."""
    hints = typing.get_type_hints(TrainConfig)
    t = hints[f.name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    if typing.get_origin(t) is list:
        return list
    return t


def coerce(name: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise UserError naming the key."""
    f = next(f for f in fields() if f.name == name)
    t = field_type(f)
    if value is None:
        return None
    try:
        if t is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if t is list:
            if isinstance(value, list):
                return [str(v) for v in value]
            return [v.strip() for v in str(value).split(",") if v.strip()]
        if t is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if t is int:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        return t(value)
    except (TypeError, ValueError):
        kind = _KINDS.get(t, t.__name__)
        raise UserError(f"--{flag_for(name)} ({name} in a config file): expected {kind}, got {value!r}") from None


_KINDS = {int: "a whole number", float: "a number", bool: "true or false"}


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the YAML file, then overrides; unknown keys are errors that list the valid ones."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file() and (PRESETS / f"{path}.yaml").is_file():
            p = PRESETS / f"{path}.yaml"  # a preset name such as smollm2-demo
        if not p.is_file():
            raise UserError(
                f"--config {path}: file not found; presets live in configs/ (e.g. configs/smollm2-demo.yaml)"
            )
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"--config {path}: expected a mapping of keys to values at the top level")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    valid = [f.name for f in fields()]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        where = f" in {path}" if path else ""
        raise UserError(f"unknown config key {unknown[0]!r}{where}; valid keys: {', '.join(valid)}")
    return TrainConfig(**{k: coerce(k, v) for k, v in values.items()}).validate()


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (loadable again with --config)."""
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
