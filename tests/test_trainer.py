"""The Trainer keeps a bf16 adapter in bf16 through --resume (peft's load_adapter upcast it to float32)."""

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import tiny_config
from finechat import config as cfg
from finechat.train import train
from finechat.trainer import restore_dtypes, trainable_dtypes


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


def test_restore_dtypes_casts_in_place():
    layer = torch.nn.Linear(4, 2).to(torch.bfloat16)
    dtypes = trainable_dtypes(layer)
    weight = layer.weight
    layer.weight.data = layer.weight.data.float()  # what peft's upcast leaves
    assert restore_dtypes(layer, dtypes) == 1 and restore_dtypes(layer, dtypes) == 0
    assert layer.weight is weight and layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
