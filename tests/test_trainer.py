"""The Trainer keeps a bf16 adapter in bf16 through --resume (peft's load_adapter upcast it to float32), and keeps
its per-step metrics on the device until it logs: the same numbers as TRL, without the collectives and host reads TRL
and the Trainer made in every step."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_config
from finechat import config as cfg
from finechat import runs
from finechat.train import train
from finechat.trainer import Trainer, restore_dtypes, trainable_dtypes


def saved_dtypes(run_dir) -> set[str]:
    with safe_open(str(run_dir / "adapter_model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in sorted(f.keys())}


def test_resumed_qlora_run_trains_its_bf16_adapter_in_bf16(tiny_mistral_dir, text_file, tmp_path):
    """QLoRA (NF4 base, bf16 compute): TRL trains the LoRA weights in bf16. 2 steps, a checkpoint, --resume for 2
    more must give the bf16 adapter of 4 uninterrupted steps, bit for bit."""
    qlora = dict(quantize="nf4", compute_dtype="bfloat16", save_steps=2)
    straight = tmp_path / "straight"
    train(tiny_config(tiny_mistral_dir, text_file, straight, max_steps=4, **qlora))
    assert saved_dtypes(straight) == {"BF16"}

    run_dir = tmp_path / "resumed"
    train(tiny_config(tiny_mistral_dir, text_file, run_dir, max_steps=2, **qlora))
    config = cfg.load_config(str(run_dir / "config.yaml"), {"max_steps": 4})
    resumed = train(config, resume=True)
    assert resumed.step == 4
    assert saved_dtypes(run_dir) == saved_dtypes(run_dir / "checkpoints" / "checkpoint-4") == {"BF16"}
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(run_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tokens_seen(run_dir) == tokens_seen(straight)  # the count goes on from the checkpoint


def tokens_seen(run_dir) -> list[int]:
    return [r["tokens_seen"] for r in runs.read_metrics(run_dir) if "loss" in r]


def test_restore_dtypes_casts_in_place():
    layer = torch.nn.Linear(4, 2).to(torch.bfloat16)
    dtypes = trainable_dtypes(layer)
    weight = layer.weight
    layer.weight.data = layer.weight.data.float()  # what peft's upcast leaves
    assert restore_dtypes(layer, dtypes) == 1 and restore_dtypes(layer, dtypes) == 0
    assert layer.weight is weight and layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16


def padded_examples(tokenizer, n: int = 10) -> list[dict[str, list[int]]]:
    """n rows of different lengths, so batches are padded (the tokens counted are not all of them)."""
    from conftest import wiki_texts

    rows = []
    for i, text in enumerate(wiki_texts(n)):
        ids = tokenizer(text)["input_ids"][: 20 + 5 * i]
        rows.append({"input_ids": ids, "assistant_masks": [1] * len(ids)})
    return rows


def logged(trainer_class, model_dir, output_dir, **settings) -> tuple[list[dict], int]:
    """The rows a trainer of this class logs in a few CPU steps of the tiny model (time-based ones left out), and
    the num_input_tokens_seen of its step-3 checkpoint."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = Dataset.from_list(padded_examples(tokenizer))
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        learning_rate=1e-3,
        max_length=64,
        packing=False,
        eval_strategy="steps",
        eval_steps=3,  # not a logging step when logging every 2
        save_steps=3,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        logging_nan_inf_filter=False,
        use_cpu=True,
        **settings,
    )
    set_seed(0)
    trainer = trainer_class(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=data,
        eval_dataset=data.select(range(4)),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    )
    assert getattr(trainer, "defer_metrics", True), "finechat.trainer mirrors another TRL than the one installed"
    trainer.train()
    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    return untimed(trainer.state.log_history), state["num_input_tokens_seen"]


def untimed(rows: list[dict]) -> list[dict]:
    """Logged rows without the numbers that depend on the clock (runtime, samples and tokens per second)."""
    return [{k: v for k, v in row.items() if "runtime" not in k and "per_second" not in k} for row in rows]


@pytest.mark.parametrize("logging_steps, grad_accum", [(1, 1), (2, 2)])
def test_logged_metrics_are_trls(tiny_model_dir, tmp_path, logging_steps, grad_accum):
    """Loss, entropy, mean_token_accuracy, num_tokens, num_input_tokens_seen, eval rows: what plain SFTTrainer logs,
    exactly, logging every step or every 2 steps of 2 micro-steps; and the token count in a checkpoint saved between
    logging steps."""
    from trl import SFTTrainer

    settings = dict(logging_steps=logging_steps, gradient_accumulation_steps=grad_accum)
    ours, ours_saved = logged(Trainer, tiny_model_dir, tmp_path / "ours", **settings)
    theirs, theirs_saved = logged(SFTTrainer, tiny_model_dir, tmp_path / "theirs", **settings)
    assert ours == theirs
    train_rows = [row for row in ours if "entropy" in row]
    assert [row["step"] for row in train_rows] == list(range(logging_steps, 5, logging_steps))
    assert 3 in [row["step"] for row in ours if "eval_entropy" in row]  # and the last step
    assert 0 < train_rows[-1]["num_tokens"] == train_rows[-1]["num_input_tokens_seen"] < 4 * grad_accum * 2 * 64
    assert ours_saved == theirs_saved > 0


class HookedTrainer(Trainer):
    """Counts the tensors the training forward saves through a saved-tensors hook of its own, installed outside
    compute_loss: hooks nest, so it sees none of those that offload_saved sends to host memory."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outer_saved = 0

    def compute_loss(self, model, inputs, *args, **kwargs):
        def pack(t):
            self.outer_saved += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            return super().compute_loss(model, inputs, *args, **kwargs)


def test_offloaded_saved_tensors_train_as_kept_ones(tiny_model_dir, tmp_path):
    """offload_saved (what FSDP runs use): every tensor the forward saves goes through torch's save_on_cpu hooks,
    and with reentrant checkpointing the run logs what it logs with them kept in place (exact on the CPU)."""

    checkpointed = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
    checkpointed["logging_steps"] = 1
    made = []

    def factory(offload):
        def make(*args, **kwargs):
            made.append(HookedTrainer(*args, offload_saved=offload, **kwargs))
            return made[-1]

        return make

    kept, _ = logged(factory(False), tiny_model_dir, tmp_path / "kept", **checkpointed)
    offloaded, _ = logged(factory(True), tiny_model_dir, tmp_path / "offloaded", **checkpointed)
    assert kept == offloaded and any("entropy" in row for row in kept)  # training rows, equal
    assert made[0].outer_saved > 0 and made[1].outer_saved == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo on CPU")
def test_ddp_step_has_only_the_collectives_ddp_needs(tiny_model_dir, text_file, tmp_path):
    """2 processes, finechat's DDP Trainer: between logging steps a step makes DDP's gradient all-reduce, the
    Trainer's all-gather of the batch's token count (the loss's denominator) and the Ctrl-C check (host only), and
    reads no tensor on the host but the model's own checks. TRL and the Trainer used to add 5 all-gathers and 6 host
    reads per micro-step. The logged rows are plain SFTTrainer's on both processes, the last batch of the data
    (whose repeats TRL leaves out of its counts) included."""
    import ddp_syncs_worker as worker

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [worker.__file__, str(tiny_model_dir), str(text_file), str(tmp_path)]
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        between = [row for row in result["steps"] if row["step"] % worker.LOGGING_STEPS]
        assert [row["step"] for row in between] == [1, 2, 4, 5]
        for row in between:
            assert row.get("all_gather", 0) == 1, row  # the Trainer's num_items_in_batch
            assert row["flag_all_reduce"] == 1 and row["all_reduce"] == 2, row  # + DDP's one bucket
            assert row.get("barrier", 0) == 0, row
            # the model's own reads in each micro-step's forward; the Ctrl-C flag; a new pass's sampler seed
            assert row["host_read"] <= worker.GRAD_ACCUM * result["forward_host_reads"] + 2, row
        ours, theirs = untimed(result["ours"]), untimed(result["theirs"])
        assert ours == theirs and [row["step"] for row in ours if "entropy" in row] == [3, 6]
        tokens = [row for row in ours if "num_tokens" in row]
        assert tokens[-1]["num_tokens"] < tokens[-1]["num_input_tokens_seen"]  # TRL's count left the repeats out


def test_right_padded_batches_train_alike_without_their_mask(tiny_model_dir, tmp_path):
    """causal_attention: the training forward gets no attention mask (nor position ids) for TRL's right-padded
    batches, and the run logs what it logs with the mask, to float32 rounding: the real tokens never see a pad
    under causal attention, and the pads' labels are ignored. Evaluation keeps the mask."""
    made, masks = [], []

    def factory(causal_attention):
        def make(*args, **kwargs):
            trainer = Trainer(*args, causal_attention=causal_attention, **kwargs)
            backbone = trainer.model.get_base_model().model
            backbone.register_forward_pre_hook(
                lambda module, args, kw: masks.append((causal_attention, module.training, kw.get("attention_mask"))),
                with_kwargs=True,
            )
            made.append(trainer)
            return trainer

        return make

    masked, _ = logged(factory(False), tiny_model_dir, tmp_path / "masked", logging_steps=1)
    unmasked, _ = logged(factory(True), tiny_model_dir, tmp_path / "unmasked", logging_steps=1)
    train_masks = [m for flag, training, m in masks if flag and training]
    assert train_masks and all(m is None for m in train_masks)
    assert all(m is not None for flag, training, m in masks if not flag and training)
    assert any(m is not None and not bool(m.all()) for flag, training, m in masks if not flag)  # padded batches
    # what dropping the mask rests on: TRL's collator pads on the right (each row's mask never rises again)
    assert all(bool((m[:, 1:] <= m[:, :-1]).all()) for _, _, m in masks if m is not None)
    assert all(m is not None for flag, training, m in masks if flag and not training)  # evaluation
    # Equal to rounding: the kernels differ (a masked and a causal attention), and on this random model rounding
    # shows most in the gradient's norm (up to 0.5% apart; with and without the mask both differ as much from the
    # real tokens alone). tests/test_fastpath.py compares the gradients against the real tokens alone.
    assert len(masked) == len(unmasked)
    for a, b in zip(masked, unmasked, strict=True):
        assert a.keys() == b.keys()
        for key, value in a.items():
            rel = 1e-2 if key == "grad_norm" else 1e-4
            assert b[key] == (pytest.approx(value, rel=rel, abs=1e-6) if isinstance(value, float) else value), key
