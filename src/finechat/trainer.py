"""The Trainer `finechat train` runs: TRL's SFTTrainer, with the adapter kept in the dtypes it was built in through
--resume, and the per-step metrics kept on the device until the Trainer logs."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
import trl
from packaging.version import Version
from torch import nn
from trl import SFTTrainer

from finechat import packing

log = logging.getLogger(__name__)

# The TRL release whose SFTTrainer.compute_loss Trainer.compute_loss reproduces. Under another one the Trainer leaves
# the loss and metrics to TRL, which syncs every step (tests/test_trainer.py compares the two).
MIRRORED_TRL = (1, 16)


class Trainer(SFTTrainer):
    """SFTTrainer whose trainable (adapter) weights keep, on --resume, the dtypes they had when it was built, and
    whose per-step metrics wait on the device for the next logging step.

    QLoRA trains its LoRA weights in bf16 (TRL casts them). On --resume the Trainer reloads the checkpoint through
    peft's load_adapter, which upcasts bf16 adapter weights to float32 in new parameters, so the resumed run trained
    and saved a float32 adapter, unlike the run it continues. The optimizer is the first thing built from the
    parameters after that reload; create_optimizer, the Trainer's documented place to change how the optimizer is
    made, puts the dtypes back first. Under FSDP (keep_dtypes=False) finechat loads the adapter itself
    (callbacks.FSDPAdapter) and FSDP owns the parameters' dtype.

    Metrics: in every micro-step TRL gathers four counters across processes and reads three numbers on the host
    (entropy, token accuracy, tokens), and the Trainer gathers and reads the input-token count: each a wait for the
    other GPU (a DDP step profiled on 2 H200s spent ~97 ms in host waits against 2.4 ms on one GPU). Here
    compute_loss computes TRL's loss, keeps those numbers per micro-step as device tensors, and gathers them in one
    collective when the Trainer logs, saves a checkpoint or evaluates; the values logged are TRL's."""

    def __init__(
        self,
        *args: Any,
        keep_dtypes: bool = True,
        offload_saved: bool = False,
        causal_attention: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # causal_attention: the fast path's layers, where plain causal attention is what the batch's mask gives
        # (finechat.fastpath.padding_is_causal). Then:
        # - TRL's collator pads chat records on the right, and the training forward gets the batch without its
        #   attention mask: the real tokens attend as with it, and the fast path runs such batches as it runs packed
        #   text (flash attention, CUDA graphs). The mask still counts the tokens;
        # - with --packing TRL's collator flattens each batch into one row of records (padding-free), and the
        #   training forward gets the records as a packing.Segments instead of position ids: the fast layers attend
        #   within each record, and transformers builds no block-diagonal mask (a host wait and a tokens x tokens
        #   mask per step). Otherwise the position ids go to the model and transformers masks.
        # The padding at a packed row's end becomes one record (finechat.packing.PackedBatches).
        if self.padding_free:
            self.data_collator = packing.PackedBatches(self.data_collator)
        self.causal_attention = causal_attention
        # Every tensor the training forward saves for backward goes to host memory and comes back in backward
        # (torch.autograd.graph.save_on_cpu). finechat uses it under FSDP, where the decoder layers are checkpointed
        # reentrantly: each layer's checkpoint saves its input through these hooks, so the inputs of all layers (and
        # the loss head's tensors) wait in host memory instead of on the GPU. The recompute in backward runs outside
        # the hooks and keeps its tensors on the GPU.
        self.offload_saved = offload_saved
        self.adapter_dtypes = trainable_dtypes(self.model) if keep_dtypes and self.model is not None else {}
        self.defer_metrics = Version(trl.__version__).release[:2] == MIRRORED_TRL
        if not self.defer_metrics:
            log.info("TRL %s: metrics synced every step (finechat defers them under TRL 1.16)", trl.__version__)
        # Per micro-step, float64 [labels counted, entropy sum, correct predictions, tokens]:
        self._kept_steps: list[torch.Tensor] = []
        self._kept_processes: list[int] = []  # per micro-step, how many processes' numbers TRL counts
        self._kept_input_tokens: list[torch.Tensor] = []  # per micro-step, this process's non-padding tokens
        self._kept_dtypes: tuple[torch.dtype, ...] = ()  # of the four numbers, as TRL gathers them

    def create_optimizer(self, *args: Any, **kwargs: Any):
        restored = restore_dtypes(self.model, self.adapter_dtypes) if self.model is not None else 0
        if restored:
            log.info("resume: %d adapter tensors back in the dtype they were trained in", restored)
        return super().create_optimizer(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        saving = self.offload_saved and model.training and torch.is_grad_enabled()
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if saving else nullcontext():
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
        if not self._defers(inputs, return_outputs):
            self.reduce_metrics()  # TRL's path appends after the micro-steps kept so far and reads their token total
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        # TRL 1.16's loss for this case (trl/trainer/sft_trainer.py, SFTTrainer.compute_loss), operation for operation.
        inputs["use_cache"] = False
        forward = inputs
        segments = packing.Segments.of(inputs) if self.causal_attention else None
        if segments is not None:
            forward = {k: v for k, v in inputs.items() if k not in packing.KEYS}
            forward["segments"] = segments
        elif self.causal_attention and inputs.get("attention_mask") is not None:
            # position_ids too: without a mask transformers reads restarts in them as packed documents (the pads are
            # 0s); the default positions are the real tokens' own, 0 to n-1.
            forward = {k: v for k, v in inputs.items() if k not in ("attention_mask", "position_ids")}
        outputs = model(**forward, fused_lm_head=True)
        per_token_loss = -outputs.log_probs  # zero on ignored positions
        if self.args.loss_type == "dft":
            per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._keep_step_metrics(outputs, inputs)
        return loss

    def _defers(self, inputs: dict[str, Any], return_outputs: bool) -> bool:
        """True for the training micro-steps whose loss compute_loss reproduces: no label smoothing, custom loss,
        MoE aux loss or tensor/sequence parallelism, and a batch TRL can count tokens in."""
        return (
            self.defer_metrics
            and self.model is not None
            and self.model.training
            and not return_outputs
            and self.compute_loss_func is None
            and self.label_smoother is None
            and not self.aux_loss_enabled
            and getattr(self.accelerator, "parallelism_config", None) is None
            and ("attention_mask" in inputs or "position_ids" in inputs)
        )

    def _keep_step_metrics(self, outputs: Any, inputs: dict[str, Any]) -> None:
        """Keep, on the device, what TRL would gather this micro-step."""
        if "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        else:  # padding-free batches: TRL counts the packed row's length
            tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        values = (outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum(), tokens)
        # float64 holds these counts and a float32 (or bf16) sum exactly, so one tensor carries them all; reduce_metrics
        # turns each back into its own dtype before summing over processes, as TRL's gather does.
        self._kept_dtypes = tuple(v.dtype for v in values)
        self._kept_steps.append(torch.stack([v.to(torch.float64) for v in values]))
        self._kept_processes.append(self._metric_processes())

    def _metric_processes(self) -> int:
        """How many processes' numbers TRL's gather_for_metrics keeps now: in the last batch of the data, the first
        `remainder` (accelerate counts the others' samples as repeats), else all of them."""
        processes = self.accelerator.num_processes
        state = self.accelerator.gradient_state
        if processes > 1 and state.end_of_dataloader and state.remainder > 0:
            return min(processes, state.remainder)
        return processes

    def _track_num_input_tokens(self, inputs):
        # The Trainer gathers this count and reads it on the host every micro-step; keep it on the device instead.
        # Other counting modes than non_padding (finechat's) are left to the Trainer, which counts as here: the
        # attention mask's ones, or (padding-free batches) the tokens other than the pad token.
        name = getattr(self.model, "main_input_name", "input_ids")
        pad = getattr(self.processing_class, "pad_token_id", None)
        if not (
            self.defer_metrics
            and self.args.include_num_input_tokens_seen == "non_padding"
            and name in inputs
            and ("attention_mask" in inputs or pad is not None)
        ):
            return super()._track_num_input_tokens(inputs)
        tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else (inputs[name] != pad).sum()
        self._kept_input_tokens.append(tokens.to(self.args.device, torch.float64))

    def reduce_metrics(self) -> None:
        """Gather the numbers kept since the last call from every process, in one collective, and file them as TRL
        and the Trainer would have, micro-step by micro-step: entropy and token accuracy in self._metrics, token
        counts in num_tokens and state.num_input_tokens_seen. Every process must call it at the same point."""
        steps, tokens = self._kept_steps, self._kept_input_tokens
        if not steps and not tokens:  # the same on every process: they run the same micro-steps
            return
        parts = ([torch.stack(steps).flatten()] if steps else []) + ([torch.stack(tokens)] if tokens else [])
        gathered = self.accelerator.gather(torch.cat(parts)).view(self.accelerator.num_processes, -1).cpu()
        per_step = gathered[:, : len(steps) * 4].reshape(-1, len(steps), 4)
        metrics = self._metrics["train"]
        for i, processes in enumerate(self._kept_processes):
            num_valid, entropy_sum, num_correct, num_tokens = (
                per_step[:processes, i, column].to(dtype).sum() for column, dtype in enumerate(self._kept_dtypes)
            )
            metrics["entropy"].append((entropy_sum / num_valid).item() if num_valid > 0 else 0.0)
            metrics["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
            self._total_train_tokens += num_tokens.item() // self._tp_size
        if steps:
            metrics["num_tokens"] = [self._total_train_tokens]
        self.state.num_input_tokens_seen += int(gathered[:, len(steps) * 4 :].to(torch.int64).sum())
        self._kept_steps, self._kept_processes, self._kept_input_tokens = [], [], []

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.reduce_metrics()  # SFTTrainer.log averages self._metrics; callbacks read state.num_input_tokens_seen
        super().log(logs, start_time)

    def _save_checkpoint(self, model, trial):
        self.reduce_metrics()  # trainer_state.json carries num_input_tokens_seen into --resume
        super()._save_checkpoint(model, trial)


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
