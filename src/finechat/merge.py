"""`finechat merge`: fold a run's LoRA adapter into the full-precision base and save a plain HF model folder (and,
with --gguf, the same model as one GGUF file inside it: finechat.gguf_export)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from finechat import models
from finechat.errors import UserError


def merge(
    adapter: str,
    output: str,
    model_spec: str | None = None,
    overwrite: bool = False,
    gguf: bool = False,
    gguf_type: str = "f16",
) -> Path:
    """Merge adapter (a run folder) into its base and write safetensors that AutoModelForCausalLM loads; with gguf,
    also <output name>-<gguf_type>.gguf in the folder.

    Always into full-precision weights: merging into the 4-bit base and re-quantizing erases a small update
    (measured: perplexity went back to the base value)."""
    from finechat import gguf_export

    if gguf:
        gguf_export.check(None, gguf_type)
    run = Path(adapter)
    if not models.is_run_dir(run):
        raise UserError(f"--adapter {adapter}: not a finechat run folder (needs adapter_config.json and finechat.json)")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise UserError(f"--output {output} already exists; pass --overwrite to replace it")
        if not (out / "finechat-merge.json").is_file():
            raise UserError(f"--overwrite: {output} was not written by finechat merge; refusing to delete it")
    base_spec = model_spec or models.read_run_meta(run)["base_model"]
    ref = models.resolve(base_spec)
    base = models.load_base(ref.path, quantize="none", compute_dtype="native")
    merged = models.load_adapter(base, run).merge_and_unload()
    tokenizer = models.load_tokenizer(str(run))
    if gguf:
        gguf_export.check(merged.config.model_type, gguf_type)

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:  # a refusal or failure here (a tokenizer GGUF cannot hold, a full disk) leaves no half-written folder
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        meta = {"base_model": base_spec, "adapter": str(run.resolve())}
        if gguf:
            file = tmp / gguf_export.file_name(out.name, gguf_type)
            gguf_export.write(merged, tokenizer, file, gguf_type, gguf_export.source_gguf(base_spec), out.name)
            meta["gguf"] = file.name
        (tmp / "finechat-merge.json").write_text(json.dumps(meta, indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
