"""The Trainer `finechat train` runs: TRL's SFTTrainer, with the adapter kept in the dtypes it was built in through
--resume."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from trl import SFTTrainer

log = logging.getLogger(__name__)


class Trainer(SFTTrainer):
    """SFTTrainer whose trainable (adapter) weights keep, on --resume, the dtypes they had when it was built.

    QLoRA trains its LoRA weights in bf16 (TRL casts them). On --resume the Trainer reloads the checkpoint through
    peft's load_adapter, which upcasts bf16 adapter weights to float32 in new parameters, so the resumed run trained
    and saved a float32 adapter, unlike the run it continues. The optimizer is the first thing built from the
    parameters after that reload; create_optimizer, the Trainer's documented place to change how the optimizer is
    made, puts the dtypes back first. Under FSDP (keep_dtypes=False) finechat loads the adapter itself
    (callbacks.FSDPAdapter) and FSDP owns the parameters' dtype."""

    def __init__(self, *args: Any, keep_dtypes: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.adapter_dtypes = trainable_dtypes(self.model) if keep_dtypes and self.model is not None else {}

    def create_optimizer(self, *args: Any, **kwargs: Any):
        restored = restore_dtypes(self.model, self.adapter_dtypes) if self.model is not None else 0
        if restored:
            log.info("resume: %d adapter tensors back in the dtype they were trained in", restored)
        return super().create_optimizer(*args, **kwargs)


def trainable_dtypes(model: nn.Module) -> dict[str, Any]:
    """Name -> dtype of every trainable parameter."""
    return {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}


def restore_dtypes(model: nn.Module, dtypes: dict[str, Any]) -> int:
    """Cast the named parameters back to the given dtypes, in place (the same Parameter objects); returns how many
    were changed."""
    changed = 0
    for name, p in model.named_parameters():
        dtype = dtypes.get(name)
        if dtype is not None and p.dtype != dtype:
            p.data = p.data.to(dtype)
            changed += 1
    return changed
