"""Run by tests/test_trainer.py under torchrun (gloo): each process trains the tiny model with finechat's DDP
Trainer (as `finechat train` builds it, Ctrl-C handling included) while torch.profiler counts, per optimizer step,
the collectives and the host reads of tensors (.item(), bool(): a GPU sync each on CUDA); then with plain TRL
SFTTrainer on the same data and arguments. It saves the counts and both trainers' logged rows."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback

from finechat import distributed, models
from finechat.callbacks import InterruptCallback
from finechat.train import _build_trainer

STEPS, LOGGING_STEPS, GRAD_ACCUM = 6, 3, 2
EXAMPLES = 9  # 2 processes x batch 2: the last batch of each pass over the data is short, as TRL's gather sees it
# What torch.profiler names the events counted (gloo's own events, one per collective, whoever called it).
COUNTED = {
    "gloo:all_gather": "all_gather",
    "gloo:all_reduce": "all_reduce",
    "gloo:broadcast": "broadcast",
    "gloo:barrier": "barrier",
    "aten::_local_scalar_dense": "host_read",
}


class CountPerStep(TrainerCallback):
    """Profiles from one step's on_step_begin to the next (forward, backward, optimizer, the callbacks, logging, the
    next step's batch) and counts COUNTED events."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self._profiler = None

    def on_step_begin(self, args, state, control, **kw):
        self._stop()
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        self._profiler.start()
        self._step = state.global_step + 1

    def on_train_end(self, args, state, control, **kw):
        self._stop()

    def _stop(self) -> None:
        if self._profiler is None:
            return
        self._profiler.stop()
        events = [e for e in self._profiler.events() if e.name in COUNTED]
        counts = Counter(COUNTED[e.name] for e in events)
        # any_process's flag: one int, where DDP's buckets hold the adapter's gradients
        counts["flag_all_reduce"] = sum(e.name == "gloo:all_reduce" and e.input_shapes == [[1]] for e in events)
        self.steps.append({"step": self._step, **counts})
        self._profiler = None


def examples(tokenizer) -> list[dict[str, list[int]]]:
    """EXAMPLES rows of different lengths, so batches are padded."""
    from conftest import wiki_texts

    rows = []
    for i, text in enumerate(wiki_texts(EXAMPLES)):
        ids = tokenizer(text)["input_ids"][: 24 + 4 * i]
        rows.append({"input_ids": ids, "assistant_masks": [1] * len(ids)})
    return rows


def forward_host_reads(trainer, data) -> int:
    """Host reads in one forward of the model on a training batch: the model's own (transformers checks the
    attention mask for padding), which a step has on one GPU too."""
    batch = trainer.data_collator([data[i] for i in range(trainer.args.per_device_train_batch_size)])
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        trainer.model(**batch)
    return sum(e.name == "aten::_local_scalar_dense" for e in profiler.events())


def main(model_dir: str, text_file: str, out: Path) -> None:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTTrainer

    from conftest import tiny_config

    plan = distributed.choose(distributed.join(), "ddp", model_dir, "none", "float32")
    config = tiny_config(
        model_dir,
        text_file,
        out / "run",
        max_steps=STEPS,
        logging_steps=LOGGING_STEPS,
        grad_accum=GRAD_ACCUM,
        save_steps=100,
        lora_dropout=0.0,
    )
    (out / "run").mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(model_dir)
    data = Dataset.from_list(examples(tokenizer))

    set_seed(config.seed)
    ours = _build_trainer(
        config, models.load_base(model_dir, compute_dtype="float32"), tokenizer, data, None, out / "run", plan
    )
    counter = CountPerStep()
    ours.add_callback(InterruptCallback())  # as train() adds it
    ours.add_callback(counter)
    ours.train()

    set_seed(config.seed)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=config.lora_targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    theirs = SFTTrainer(
        model=models.load_base(model_dir, compute_dtype="float32"),
        args=ours.args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
    )
    distributed.ddp_options(theirs, plan)
    theirs.train()

    result = {"steps": counter.steps, "ours": ours.state.log_history, "theirs": theirs.state.log_history}
    result["forward_host_reads"] = forward_host_reads(ours, data)
    (out / f"rank{plan.rank}.json").write_text(json.dumps(result))
    distributed.finish(plan)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
