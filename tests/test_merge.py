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


@pytest.mark.parametrize("gguf_type,tolerance", [("f32", 1e-4), ("f16", 2e-2), ("q8_0", 0.2)])
def test_gguf_file_loads_in_transformers_with_the_merged_logits(run_dir, tmp_path, gguf_type, tolerance):
    """--gguf writes the merged model as GGUF; transformers' own GGUF reader (independent of finechat's writer: it
    undoes the q/k row order and rebuilds the tokenizer) gives the merged folder's logits and tokens."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge(str(run_dir), str(tmp_path / "merged"), gguf=True, gguf_type=gguf_type)
    name = f"merged-{gguf_type}.gguf"
    assert (out / name).is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
    ids = torch.randint(0, 500, (2, 32))
    with torch.no_grad():
        want, got = merged(input_ids=ids).logits, from_gguf(input_ids=ids).logits
    assert (got - want).abs().max() < tolerance * want.abs().max()
    if gguf_type == "f32":
        text = "<|im_start|>user\nThe history of Paris, France.<|im_end|>"
        tokenizer, gguf_tokenizer = (
            AutoTokenizer.from_pretrained(out),
            AutoTokenizer.from_pretrained(out, gguf_file=name),
        )
        assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
        fields = gguf.GGUFReader(out / name).fields  # (transformers' reader leaves the template out)
        assert fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
        assert fields["general.architecture"].contents() == "llama"


def test_gguf_refuses_what_it_cannot_write(run_dir, tmp_path):
    with pytest.raises(UserError, match="--gguf-type q2: use one of f16, bf16, q8_0, f32"):
        merge(str(run_dir), str(tmp_path / "m"), gguf=True, gguf_type="q2")
    assert not (tmp_path / "m").exists()


def test_gguf_tokenizers_that_would_split_otherwise_are_refused():
    """A byte-level BPE whose pre-tokenizer is not GPT-2's split (Qwen2, Llama 3) or a SentencePiece-style BPE (byte
    fallback: Mistral, Llama 2) would tokenize differently in a GGUF runtime; they are refused with the way out."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from finechat import gguf_export

    def fast(model, pre=None):
        tok = Tokenizer(model)
        if pre is not None:
            tok.pre_tokenizer = pre
        return PreTrainedTokenizerFast(tokenizer_object=tok)

    vocab, merges = {"a": 0, "b": 1, "ab": 2}, [("a", "b")]
    split = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    for tokenizer, kind in (
        (fast(models.BPE(vocab, merges, byte_fallback=True)), "byte fallback"),
        (fast(models.BPE(vocab, merges), split), "its own pre-tokenization: Split, ByteLevel"),
        (fast(models.WordLevel(vocab, unk_token="a")), "WordLevel"),
    ):
        with pytest.raises(UserError, match=f"tokenizer \\(.*{kind}.*convert_hf_to_gguf.py"):
            gguf_export._bpe_tokenizer(tokenizer)
    assert gguf_export._bpe_tokenizer(fast(models.BPE(vocab, merges), pre_tokenizers.ByteLevel()))
