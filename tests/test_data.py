import json

import pytest

from finechat import data
from finechat.errors import UserError


def test_wiki_offline_has_all_articles():
    corpus = data.load_corpus("wiki-offline")
    assert len(corpus.records) == 10033
    assert corpus.records[0].text.startswith("20th-century classical music\n\n")


def test_wikitext_txt_splits_at_top_level_headings(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text(" = Alpha = \n\n Alpha text . \n = = Section = = \n more . \n = Beta = \n Beta text . \n")
    records = data.load_corpus(str(path)).records
    assert len(records) == 2
    assert "= = Section = =" in records[0].text and records[1].text.startswith("= Beta =")


def test_jsonl_formats(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [
        {"text": "plain"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"instruction": "Add", "input": "1+1", "output": "2"},
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "hi"},
                {"from": "gpt", "value": "yo"},
            ]
        },
        {"prompt": "2+2?", "completion": "4"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    records = data.load_corpus(str(path)).records
    assert records[0].text == "plain"
    assert records[1].messages[1] == {"role": "assistant", "content": "hello"}
    assert records[2].messages == [{"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    assert [m["role"] for m in records[3].messages] == ["system", "user", "assistant"]  # ShareGPT's speakers
    assert records[3].messages[2]["content"] == "yo"
    assert records[4].messages == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


def test_json_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}]))
    assert [r.text for r in data.load_corpus(str(tmp_path / "d.json")).records] == ["a", "b"]
    pq.write_table(pa.table({"text": ["x", "y", "z"]}), tmp_path / "d.parquet")
    assert [r.text for r in data.load_corpus(str(tmp_path / "d.parquet")).records] == ["x", "y", "z"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "ok"}\n{"text": broken}\n', r"d.jsonl:2: not valid JSON"),
        ("", r"no usable records"),
        ('{"text": "   "}\n', r"no usable records"),
        (
            '{"prompt": "x"}\n',
            r"d.jsonl:1: no text, messages, conversations, prompt/completion or instruction/output field \(has prompt\)",
        ),
        ('{"messages": [{"role": "wizard", "content": "x"}]}\n', r"unknown role 'wizard'"),
        ('{"conversations": [{"from": "tool", "value": "x"}]}\n', r"d.jsonl:1: unknown from 'tool'; use system, human"),
        ('{"conversations": [{"from": "human", "value": "x"}]}\n', r"needs at least one assistant message"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        data.load_corpus(str(path))


def test_missing_file_and_bad_spec(tmp_path):
    with pytest.raises(UserError, match="--data .*nope.txt: file not found"):
        data.load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(UserError, match="not a file, not wiki-offline"):
        data.load_corpus("no such thing here")


def test_heldout_split_is_seeded_and_disjoint():
    corpus = data.Corpus([data.Record(text=f"doc {i}") for i in range(100)])
    train1, held1 = data.train_eval_split(corpus, None, 0.1, seed=3)
    train2, held2 = data.train_eval_split(corpus, None, 0.1, seed=3)
    assert [r.text for r in held1] == [r.text for r in held2] and len(held1) == 10
    assert not {r.text for r in held1} & {r.text for r in train1}


def test_text_is_packed_into_full_blocks(tiny_model_dir):
    from finechat.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    records = [data.Record(text="The quick brown fox jumps over the lazy dog. " * 20) for _ in range(5)]
    examples = data.tokenize(records, tok, 64)
    assert all(len(e["input_ids"]) == 64 for e in examples[:-1])
    total = sum(len(tok(r.text)["input_ids"]) + 1 for r in records)
    assert sum(len(e["input_ids"]) for e in examples) == total
    assert sum(e["input_ids"].count(tok.eos_token_id) for e in examples) == len(records)  # one EOS per document
    assert 0 < len(examples[-1]["input_ids"]) < 64  # evaluation keeps the short last block; training does not:
    whole = data.tokenize(records, tok, 64, whole_blocks=True)
    assert whole == examples[:-1] and all(len(e["input_ids"]) == 64 for e in whole)
    short = [data.Record(text="The quick brown fox.")]  # no full block: the short one trains
    assert data.tokenize(short, tok, 64, whole_blocks=True) == data.tokenize(short, tok, 64)


def test_chat_masks_cover_assistant_turns_only(tiny_model_dir):
    from finechat.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green."},
    ]
    ids, mask = data.chat_tokens(messages, tok)
    assert len(ids) == len(mask)
    trained = tok.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert "Blue." in trained and "Green." in trained
    assert "Name a colour" not in trained and "Be brief" not in trained and "Another" not in trained
