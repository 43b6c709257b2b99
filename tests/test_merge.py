import pytest
import torch

from conftest import tiny_config
from finechat.errors import UserError
from finechat.merge import merge
from finechat.train import train


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, text_file, tmp_path_factory):
    run = tmp_path_factory.mktemp("merge") / "run"
    train(tiny_config(tiny_model_dir, text_file, run, max_steps=3, quantize="nf4", learning_rate=1e-2, max_eval_docs=2))
    return run


def test_merged_logits_equal_adapter_logits(run_dir, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merge(str(run_dir), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no finechat
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir).eval()
    ids = torch.randint(0, 500, (2, 32))
    with torch.no_grad():
        expected, got, plain = adapted(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3  # the update is really in the merged weights
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_merge_refuses_existing_output_and_non_runs(run_dir, tiny_model_dir, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        merge(str(run_dir), str(taken))
    with pytest.raises(UserError, match="was not written by finechat merge"):
        merge(str(run_dir), str(taken), overwrite=True)
    assert (taken / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="not a finechat run folder"):
        merge(str(tiny_model_dir), str(tmp_path / "x"))
