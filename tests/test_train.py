import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import press_ctrl_c, tiny_config
from finechat import config as cfg
from finechat import runs
from finechat.errors import UserError
from finechat.train import train


@pytest.fixture(scope="module")
def nf4_run(tiny_mistral_dir, text_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "nf4"
    config = tiny_config(tiny_mistral_dir, text_file, run_dir, quantize="nf4", eval_steps=2)
    return train(config), run_dir


def test_run_folder_describes_itself(nf4_run, tiny_mistral_dir):
    result, run_dir = nf4_run
    assert result.step == 4 and result.eval_perplexity > 1 and result.tokens_per_s > 0
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.yaml",
        "finechat.json",
        "metrics.jsonl",
        "loss.png",
        "heldout.jsonl",
        "tokenizer.json",
        "checkpoints",
    } <= names
    meta = json.loads((run_dir / "finechat.json").read_text())
    assert meta["base_model"] == str(tiny_mistral_dir) and meta["status"] == "complete" and meta["step"] == 4
    assert cfg.load_config(str(run_dir / "config.yaml")).quantize == "nf4"
    assert (
        json.loads((run_dir / "tokenizer_config.json").read_text()).get("chat_template")
        or (run_dir / "chat_template.jinja").is_file()
    )
    rows = runs.read_metrics(run_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows if "loss" in r)
    assert [r["step"] for r in rows if "eval_loss" in r][:3] == [0, 2, 4]  # from the base model on, every eval_steps
    assert [p.name for p in runs.checkpoints(run_dir)] == ["checkpoint-2", "checkpoint-4"]
    assert not any((run_dir / runs.STAGING).glob("checkpoint-*"))  # all moved in complete


def test_adapter_loads_with_plain_peft(nf4_run, tiny_mistral_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run_dir = nf4_run
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_mistral_dir), run_dir)
    cfg_json = json.loads((run_dir / "adapter_config.json").read_text())
    assert cfg_json["r"] == 16 and cfg_json["lora_alpha"] == 32
    assert set(cfg_json["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # training moved B away from its zero init


def test_existing_output_is_refused_and_kept(tiny_model_dir, text_file, tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="already exists; pass --resume .* or --overwrite"):
        train(tiny_config(tiny_model_dir, text_file, run_dir))
    with pytest.raises(UserError, match="not a finechat run folder .* refusing to delete"):
        train(tiny_config(tiny_model_dir, text_file, run_dir), overwrite=True)
    assert (run_dir / "notes.txt").read_text() == "precious"


def test_resume_without_checkpoint_is_refused(tiny_model_dir, text_file, tmp_path):
    with pytest.raises(UserError, match="no checkpoint to continue from"):
        train(tiny_config(tiny_model_dir, text_file, tmp_path / "new"), resume=True)


def test_ctrl_c_saves_a_checkpoint_and_resume_reaches_the_same_step(tiny_model_dir, text_file, tmp_path):
    """A real process gets SIGINT mid-run, saves, exits 130; --resume finishes at the same final step and the
    resumed adapter equals the one of an uninterrupted run."""
    steps = 30
    straight = train(tiny_config(tiny_model_dir, text_file, tmp_path / "straight", max_steps=steps, save_steps=100))
    run_dir = tmp_path / "interrupted"
    cmd = [
        sys.executable,
        "-m",
        "finechat",
        "train",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(text_file),
        "--output",
        str(run_dir),
        "--max-steps",
        str(steps),
        "--batch-size",
        "2",
        "--max-seq-length",
        "64",
        "--save-steps",
        "100",
        "--quantize",
        "none",
        "--compute-dtype",
        "float32",
        "--max-eval-docs",
        "4",
        "--eval-fraction",
        "0.1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(), start_new_session=True
    )
    press_ctrl_c(proc, run_dir, at_step=3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in out and "Traceback" not in err
    saved = runs.last_checkpoint(run_dir)
    assert saved is not None and 3 <= runs.checkpoint_step(saved) < steps

    resumed = train(cfg.load_config(str(run_dir / "config.yaml")), resume=True)
    assert resumed.step == straight.step == steps
    rows = [r for r in runs.read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    from safetensors.torch import load_file

    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(run_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_batches_pad_to_few_shapes_on_gpu_only():
    from finechat.train import pad_multiple

    assert pad_multiple(1024, on_gpu=True) == 64 and pad_multiple(2048, on_gpu=True) == 64
    assert pad_multiple(1000, on_gpu=True) is None  # padding to 1,024 would pass the limit
    assert pad_multiple(1024, on_gpu=False) is None  # nothing compiles per shape on the CPU
    # packed: a batch's flattened row pads to whole rows, one or two shapes a run
    assert pad_multiple(1000, on_gpu=True, packed=True) == 1000 and pad_multiple(1000, False, packed=True) is None
