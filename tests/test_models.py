import json

import pytest
import torch

from finechat import models
from finechat.errors import UserError


def test_local_folder_resolves_to_itself(tiny_model_dir):
    ref = models.resolve(str(tiny_model_dir))
    assert ref.path == str(tiny_model_dir) and ref.adapter is None


def test_run_folder_resolves_to_recorded_base(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text("{}")
    (run / models.RUN_META).write_text(json.dumps({"base_model": str(tiny_model_dir)}))
    ref = models.resolve(str(run))
    assert ref.path == str(tiny_model_dir) and ref.adapter == run and ref.base_spec == str(tiny_model_dir)


@pytest.mark.parametrize("spec", ["./missing-folder", "/no/such/model", "a/b/c", "missing.gguf", "bad id!"])
def test_unknown_models_are_one_line_errors(spec):
    with pytest.raises(UserError, match=r"--model "):
        models.resolve(spec)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_hub_id_passes_through_and_fails_offline_with_one_line():
    assert models.resolve("mistralai/Mistral-7B-Instruct-v0.2").path == "mistralai/Mistral-7B-Instruct-v0.2"
    with pytest.raises(UserError, match="could not load"):
        models.load_tokenizer("finechat-test/does-not-exist")


def test_quantization_config_is_the_seed_recipe():
    q = models.quantization_config("nf4", "bfloat16", True)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert models.quantization_config("none") is None
    assert models.quantization_config("nf4", storage="bfloat16").bnb_4bit_quant_storage == torch.bfloat16


def test_nf4_lora_gradients_match_full_precision_reference(tiny_model_dir):
    """bitsandbytes 0.50.2 on CPU repacks 4-bit weights after an eval-mode forward and then gives wrong LoRA
    gradients; finechat turns the repacking off. Reference: the same dequantized weights in fp32."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    q = models.load_base(str(tiny_model_dir), quantize="nf4", compute_dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    ref_modules = dict(ref.named_modules())
    n4 = 0
    for name, module in q.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            n4 += 1
            assert module.support_avx512bf16_for_cpu is False
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            ref_modules[name].weight.data.copy_(w)
    assert n4 == 14  # 7 projections x 2 layers

    lora = dict(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    torch.manual_seed(0)
    pq = get_peft_model(q, LoraConfig(**lora, init_lora_weights=False))
    torch.manual_seed(0)
    pr = get_peft_model(ref, LoraConfig(**lora, init_lora_weights=False))
    ids = torch.randint(0, 500, (2, 24))
    pq.eval()
    with torch.no_grad():
        pq(input_ids=ids)  # the eval-mode forward that triggered the repacking
    for m in (pq, pr):
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    grads_q = {n: p.grad for n, p in pq.named_parameters() if p.requires_grad}
    grads_r = {n: p.grad for n, p in pr.named_parameters() if p.requires_grad}
    assert grads_q.keys() == grads_r.keys() and len(grads_q) == 12
    for name in grads_q:
        assert grads_q[name] is not None, f"{name}: no gradient reached the LoRA weight"
        cos = torch.nn.functional.cosine_similarity(grads_q[name].flatten(), grads_r[name].flatten(), dim=0)
        assert cos > 0.999, (name, float(cos))
