"""`finechat train`: QLoRA (or full-precision LoRA) supervised fine-tuning through TRL's SFTTrainer."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finechat import data, distributed, models, runs
from finechat.config import TrainConfig, save_config
from finechat.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    run_dir: Path
    step: int
    train_loss: float | None
    eval_loss: float | None
    eval_perplexity: float | None
    tokens_per_s: float
    interrupted: bool = False


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Fine-tune config.model on config.data and write a self-describing run folder."""
    import torch
    from datasets import Dataset
    from transformers import set_seed

    run_dir = Path(config.run_dir)
    runs.check_output(run_dir, resume=resume, overwrite=overwrite)
    plan = distributed.join()  # one process, or one of several started by torchrun / accelerate launch / --gpus
    if config.numa_binding:
        log.info("NUMA binding: %s", distributed.bind_to_gpu(plan))
    set_seed(config.seed)

    # Build: model reference, tokenizer and data (all errors about inputs surface before the slow model load).
    with distributed.main_first(plan):
        ref = models.resolve(config.model)
    if ref.adapter is not None:
        raise UserError(
            f"--model {config.model} is a run folder; merge it first (finechat merge) and train on the merged folder"
        )
    tokenizer = models.load_tokenizer(ref.path)
    train_records, eval_records = data.train_eval_split(
        data.load_corpus(config.data),
        config.eval_data,
        config.eval_fraction,
        config.seed,
        config.max_train_docs,
        config.max_eval_docs,
    )
    train_examples = data.tokenize(train_records, tokenizer, config.max_seq_length, whole_blocks=True)
    eval_examples = data.tokenize(eval_records, tokenizer, config.max_seq_length)
    plan = distributed.choose(plan, config.distributed, ref.path, config.quantize, config.compute_dtype)
    distributed.barrier(plan)  # every process has checked the run folder before rank 0 (re)creates it
    if plan.is_main:
        runs.create(run_dir, resume=resume)
        save_config(config, run_dir / "config.yaml")
        runs.save_records(run_dir / "heldout.jsonl", eval_records)
        runs.write_meta(
            run_dir, base_model=config.model, base_path=ref.path, status="running", processes=plan.world_size
        )
    distributed.barrier(plan)
    log.info("data: %d training examples, %d held-out examples", len(train_examples), len(eval_examples))

    # Load and wrap the model.
    model = models.load_base(
        ref.path,
        quantize=config.quantize,
        compute_dtype=config.compute_dtype,
        double_quant=config.double_quant,
        storage=config.compute_dtype if plan.mode == "fsdp" else None,  # FSDP shards 4-bit weights stored as floats
    )
    trainer = _build_trainer(
        config,
        model,
        tokenizer,
        Dataset.from_list(train_examples),
        Dataset.from_list(eval_examples) if config.eval_steps else None,
        run_dir,
        plan,
    )

    # Loop.
    start = distributed.from_main(plan, runs.last_checkpoint(run_dir) if resume else None)  # all resume alike
    if start is not None and plan.is_main:
        runs.truncate_metrics(run_dir, runs.checkpoint_step(start))
        log.info("resuming from %s", start)
    from finechat.callbacks import InterruptCallback, ProgressAndMetrics

    stopper = InterruptCallback()
    trainer.add_callback(stopper)
    try:
        with stopper.armed(), _frozen_heap():
            output = trainer.train(resume_from_checkpoint=str(start) if start else None)
    except torch.OutOfMemoryError:
        raise UserError(
            f"out of memory at --batch-size {config.batch_size} --max-seq-length {config.max_seq_length}: lower one of "
            "them (raise --grad-accum to keep the effective batch), or keep --quantize nf4 and --gradient-checkpointing"
        ) from None

    stopper.interrupted = distributed.any_process(stopper.interrupted)  # all processes evaluate, or none

    # Save: adapter + tokenizer at the top of the run folder, final numbers, curve.
    distributed.save_adapter(trainer, run_dir, plan)
    if plan.is_main:
        tokenizer.save_pretrained(run_dir)
    step = trainer.state.global_step
    from finechat.evaluate import perplexity

    result = perplexity(trainer.model, eval_examples, batch_size=config.batch_size) if not stopper.interrupted else None
    if result and plan.is_main:
        runs.append_metrics(run_dir, {"step": step, "eval_loss": result.loss, "eval_perplexity": result.perplexity})
    progress = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressAndMetrics))
    summary = TrainResult(
        run_dir,
        step,
        output.training_loss if output else None,
        result.loss if result else None,
        result.perplexity if result else None,
        progress.mean_tokens_per_s(),
        stopper.interrupted,
    )
    if plan.is_main:
        runs.plot_loss(run_dir)
        runs.write_meta(
            run_dir,
            status="interrupted" if stopper.interrupted else "complete",
            step=step,
            train_loss=summary.train_loss,
            eval_perplexity=summary.eval_perplexity,
            tokens_per_s=summary.tokens_per_s,
        )
    if config.push_to_hub and not stopper.interrupted and plan.is_main:
        from finechat.hub import push

        push(run_dir, config.push_to_hub)
    distributed.finish(plan)
    return summary


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Leave the objects alive now (model, tokenizer, datasets: millions under a real corpus) out of Python's garbage
    collections while the block runs. A full collection walks every tracked object; one during a step stalls that
    step, and under DDP every process with it. (It was suspected of the 2-3 s DDP step in the H200 benches; round 3
    had the stall with this on and 0.5 ms of collection in it, so that stall has another cause: docs/benchmarks.md.)"""
    gc.collect()  # what is garbage already is freed, not frozen
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()  # collectable again: train() may run many times in one process (the tests do)


PAD_MULTIPLE = 64


def pad_multiple(max_seq_length: int, on_gpu: bool, packed: bool = False) -> int | None:
    """What batches are padded to a multiple of: on a GPU, PAD_MULTIPLE where max_seq_length is one, so that chat
    data of every length makes at most max_seq_length / 64 batch shapes. A batch of a new shape compiles kernel
    variants and plans attention in its first step (a 3.9-4.3 s step on an H200, from text's short last block:
    docs/benchmarks.md, multi-GPU rounds 4-7); the cost per new chat length was not measured.

    Packed (a batch is one flattened row of packed rows, each nearly max_seq_length long): max_seq_length, so that a
    batch is one row of batch size x max_seq_length tokens unless its rows leave a whole row's worth of room, and
    the layer graphs see one or two shapes."""
    if not on_gpu:
        return None
    if packed:
        return max_seq_length
    return PAD_MULTIPLE if max_seq_length % PAD_MULTIPLE == 0 else None


def _build_trainer(
    config: TrainConfig, model, tokenizer, train_ds, eval_ds, run_dir: Path, plan: distributed.Plan | None = None
):
    """SFTTrainer with the seed's recipe: k-bit preparation, gradient checkpointing, LoRA, paged AdamW; DDP or FSDP
    when the plan says so."""
    import torch
    from peft import LoraConfig, prepare_model_for_kbit_training
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import SFTConfig

    from finechat import fastpath, optim, steptrace
    from finechat.callbacks import FSDPAdapter, ProgressAndMetrics
    from finechat.trainer import Trainer

    on_gpu = torch.cuda.is_available()
    plan = plan or distributed.Plan()
    # FSDP wraps the model's own decoder layers and shards uniform dtypes only: no fused layers, no float32 upcast.
    fsdp = plan.mode == "fsdp"
    # The fast path: CUDA + Llama-family, fused layers, offloaded checkpoints.
    fast = config.fast_path and not fsdp and fastpath.supported(model)
    if fast:
        model = fastpath.prepare(
            model,
            gradient_checkpointing=config.gradient_checkpointing,
            offload=config.offload_activations,
            cuda_graphs=config.cuda_graphs,
            cuda_graph_backward=config.cuda_graph_backward,
            cuda_graph_shapes=config.cuda_graph_shapes,
            keep_attention=config.keep_attention,
        )
    elif config.quantize == "nf4" and not fsdp:
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    bf16 = on_gpu and models.resolve_dtype(config.compute_dtype) == torch.bfloat16
    args = SFTConfig(
        output_dir=str(run_dir / runs.STAGING),
        max_steps=config.max_steps,
        num_train_epochs=config.num_epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        optim=distributed.optimizer(plan, config.optimizer),
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs=distributed.gradient_checkpointing_kwargs(plan),
        bf16=bf16,
        max_length=config.max_seq_length,
        # data.tokenize already packs text into full blocks; --packing packs chat records into rows too, and each
        # batch comes as one flattened row (padding-free, finechat.packing)
        packing=config.packing,
        packing_strategy="bfd",
        pad_to_multiple_of=pad_multiple(config.max_seq_length, on_gpu, config.packing),
        logging_steps=config.logging_steps,
        eval_strategy="steps" if eval_ds is not None else "no",
        eval_steps=config.eval_steps or None,
        eval_on_start=eval_ds is not None,  # the curve starts from the base model's held-out loss
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,  # rotation happens in checkpoints/, see runs.publish_checkpoint
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",  # counted on the device between logging steps (finechat.trainer)
        # The filter checks every micro-step's loss for NaN/inf on the host, a GPU sync per micro-step. Off, a NaN loss
        # shows as NaN in metrics.jsonl; with it, the NaN steps (and once the weights are NaN, all later ones) were
        # logged as the mean of earlier losses, while the optimizer stepped on them all the same.
        logging_nan_inf_filter=False,
        dataloader_num_workers=0,
        **distributed.trainer_kwargs(plan, on_gpu),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=lora,
        # The fast path's paged AdamW: bitsandbytes' update without a device wait per tensor (finechat.optim).
        optimizer_cls_and_kwargs=optim.trainer_optimizer(args) if fast else None,
        keep_dtypes=not fsdp,  # --resume gives back a bf16 adapter in bf16 (finechat.trainer)
        # FSDP runs the plain layers, checkpointed reentrantly: their saved inputs can wait in host memory too.
        offload_saved=fsdp and config.offload_activations and config.gradient_checkpointing,
        # Chat records train without their padding mask, packed ones as Segments (finechat.trainer), on the fast path
        # where plain causal attention is what the mask gives: not under a sliding window shorter than the rows.
        causal_attention=fast and fastpath.padding_is_causal(model, config.max_seq_length),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    distributed.ddp_options(trainer, plan)
    if fsdp:  # first: ProgressAndMetrics publishes the checkpoints this callback completes
        trainer.add_callback(FSDPAdapter(trainer.model, run_dir))
    trainer.add_callback(ProgressAndMetrics(run_dir, config.save_total_limit))
    trace = steptrace.from_environment(plan.rank)  # benchmarks: step times and a profile (FINECHAT_STEP_TRACE)
    if trace is not None:
        trainer.add_callback(trace)
    if config.quantize == "nf4":
        models.disable_cpu_bf16_repack(trainer.model)
    return trainer
