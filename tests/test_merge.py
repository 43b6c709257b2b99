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
    """A byte-level BPE whose pre-tokenizer is not GPT-2's split (Qwen2, Llama 3), or a byte-fallback BPE split
    otherwise than Mistral's and Llama 2's tokenizer.json (e.g. by a Metaspace pre-tokenizer), would tokenize
    differently in a GGUF runtime; they are refused with the way out."""
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
        (fast(models.BPE(vocab, merges, byte_fallback=True), pre_tokenizers.Whitespace()), "split by Whitespace"),
        (
            fast(models.BPE(vocab, merges, byte_fallback=True), pre_tokenizers.Metaspace(prepend_scheme="first")),
            "split by Metaspace \\(prepend_scheme first\\)",
        ),
        (fast(models.BPE(vocab, merges), split), "its own pre-tokenization: Split, ByteLevel"),
        (fast(models.WordLevel(vocab, unk_token="a")), "WordLevel"),
    ):
        with pytest.raises(UserError, match=f"tokenizer \\(.*{kind}.*convert_hf_to_gguf.py"):
            gguf_export._json_tokenizer(tokenizer)
    assert gguf_export._json_tokenizer(fast(models.BPE(vocab, merges), pre_tokenizers.ByteLevel()))


SP_TEXTS = [
    "Hello world, 1234!",
    "The history of Paris, France: 1,234 people in 2023's census.",
    "naïve café — déjà vu 🙂",
    "<s>[INST] What is the capital of France? [/INST]",
    "  two  spaces\nand a newline",
]


@pytest.fixture(scope="module", params=["as-transformers-loads-it", "as-the-file-is"])
def sp_run_dir(text_file, tmp_path_factory, request):
    """A run of a tiny random Mistral whose tokenizer is SentencePiece-style (conftest.sentencepiece_tokenizer, in
    both its forms; it tokenizes SP_TEXTS as SentencePiece itself does)."""
    from conftest import build_model, sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer(as_file=request.param == "as-the-file-is")
    folder = build_model(tmp_path_factory.mktemp("sp") / "model", arch="mistral", tokenizer=tokenizer)
    run = folder.parent / "run"
    train(tiny_config(folder, text_file, run, max_steps=2, max_eval_docs=2))
    return run


def test_gguf_of_a_sentencepiece_style_tokenizer_reads_back_alike(sp_run_dir, tmp_path):
    """Mistral's kind of tokenizer (BPE with byte fallback and "▁" word marks) is written as GGUF's "llama" tokenizer
    (scores, byte tokens, the space prefix); transformers' GGUF reader gives the run's tokens and the merged logits."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge(str(sp_run_dir), str(tmp_path / "merged"), gguf=True, gguf_type="f32")
    name = "merged-f32.gguf"
    fields = gguf.GGUFReader(out / name).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.add_space_prefix"].contents() is True
    tokenizer, from_gguf = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(out, gguf_file=name)
    for text in SP_TEXTS:
        assert from_gguf(text)["input_ids"] == tokenizer(text)["input_ids"], text
    ids = torch.tensor([tokenizer(SP_TEXTS[1])["input_ids"]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_a_refused_gguf_tokenizer_leaves_nothing_behind(text_file, tmp_path):
    """A tokenizer refused while the GGUF file is written (after the merged folder's files): the error, and neither
    the output folder nor a half-written temporary one."""
    from tokenizers import pre_tokenizers

    from conftest import build_model, sentencepiece_tokenizer

    tokenizer = sentencepiece_tokenizer(as_file=True)
    tokenizer.backend_tokenizer.normalizer = None
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    folder = build_model(tmp_path / "model", arch="mistral", tokenizer=tokenizer)
    run = tmp_path / "run"
    train(tiny_config(folder, text_file, run, max_steps=1, max_eval_docs=2))
    with pytest.raises(UserError, match="prepend_scheme first.*convert_hf_to_gguf.py"):
        merge(str(run), str(tmp_path / "merged"), gguf=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "run"]
