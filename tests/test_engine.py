import re
import threading

import pytest
import torch

from finechat.engine import SENTENCE_END, Engine, GenerationSettings, _trim_to_boundary, length_tokens
from finechat.errors import UserError


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir))


def prompt(engine, text="Tell me about the history of music."):
    return engine.chat_prompt([{"role": "user", "content": text}], reserve=64)


def test_length_presets_are_the_seeds():
    assert [length_tokens(n) for n in ("short", "medium", "long", "very-long")] == [100, 250, 500, 20000]
    with pytest.raises(UserError, match="unknown preset"):
        length_tokens("huge")


def test_greedy_equals_transformers_generate(engine):
    ids = prompt(engine)
    settings = GenerationSettings(max_new_tokens=40, stop_at_punctuation=False)
    generation = engine.generate(ids, settings)
    streamed = "".join(generation)
    out = engine.model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)
    expected = engine.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert streamed == generation.result.text == expected
    assert generation.result.completion_tokens == out.shape[1] - len(ids)
    assert generation.result.prompt_tokens == len(ids)


def test_sampling_is_seeded(engine):
    ids = prompt(engine)
    a = engine.generate(ids, GenerationSettings(max_new_tokens=30, temperature=1.0, seed=1, stop_at_punctuation=False))
    b = engine.generate(ids, GenerationSettings(max_new_tokens=30, temperature=1.0, seed=1, stop_at_punctuation=False))
    c = engine.generate(ids, GenerationSettings(max_new_tokens=30, temperature=1.0, seed=2, stop_at_punctuation=False))
    assert a.complete().text == b.complete().text != c.complete().text


def test_stop_string_cuts_reply_and_stream(engine):
    ids = prompt(engine)
    full = engine.generate(ids, GenerationSettings(max_new_tokens=40, stop_at_punctuation=False)).complete().text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    generation = engine.generate(ids, GenerationSettings(max_new_tokens=40, stop=[stop], stop_at_punctuation=False))
    streamed = "".join(generation)
    assert generation.result.finish_reason == "stop"
    assert streamed == generation.result.text == full[: full.index(stop)]


def test_replies_end_at_a_sentence_end_past_the_soft_limit(engine):
    """Sampled text from the random model contains '. ' now and then. With the same seed the token stream is the
    same with and without the criterion, so the criterion's reply must be the plain reply cut at a sentence end."""
    ended_at_sentence = 0
    for seed in range(10):
        plain = GenerationSettings(max_new_tokens=60, temperature=1.0, seed=seed, stop_at_punctuation=False)
        settings = GenerationSettings(max_new_tokens=30, temperature=1.0, seed=seed, stop_at_punctuation=True)
        soft, hard = settings.limits()
        full = engine.generate(prompt(engine), plain).complete()
        generation = engine.generate(prompt(engine), settings)
        streamed = "".join(generation)
        r = generation.result
        assert streamed == r.text and full.text.startswith(r.text) and r.completion_tokens <= hard
        if r.finish_reason == "stop" and len(r.text) < len(full.text):
            assert re.search(r"[.!?…][\"'”’»)\]]*$", r.text) and r.completion_tokens >= soft, r
            ended_at_sentence += 1
        if r.finish_reason == "length":
            assert full.text[len(r.text) : len(r.text) + 1] in (" ", "\n") or re.search(r"[.!?]$", r.text), r
    assert ended_at_sentence >= 2


def test_cancel_stops_generation(engine):
    cancel = threading.Event()
    generation = engine.generate(
        prompt(engine), GenerationSettings(max_new_tokens=200, stop_at_punctuation=False), cancel
    )
    cancel.set()
    result = generation.complete()
    assert result.finish_reason == "cancelled" and result.completion_tokens == 0


def test_history_is_trimmed_from_the_oldest_turn(engine):
    long_turn = "word " * 120
    messages = [{"role": "system", "content": "Be kind."}]
    for i in range(6):
        messages += [
            {"role": "user", "content": f"q{i} {long_turn}"},
            {"role": "assistant", "content": f"a{i} {long_turn}"},
        ]
    messages.append({"role": "user", "content": "last question"})
    ids = engine.chat_prompt(messages, reserve=100)
    text = engine.tokenizer.decode(ids)
    assert len(ids) + 100 <= engine.context_window
    assert "Be kind." in text and "last question" in text and "q0" not in text
    assert text.count("<|im_start|>user") == text.count("<|im_start|>assistant")  # whole user/assistant pairs dropped
    with pytest.raises(UserError, match="context window is 512"):
        engine.chat_prompt(messages, reserve=100, trim=False)


def test_single_message_too_long_is_an_error(engine):
    with pytest.raises(UserError, match="context window"):
        engine.chat_prompt([{"role": "user", "content": "word " * 2000}], reserve=10)


def test_sentence_end_pattern():
    assert [m.group() for m in SENTENCE_END.finditer('He said "Stop." Then (quietly!) left? ok ')] == ['."', "!)", "?"]
    assert not SENTENCE_END.search("pi is 3.14 and e.g")


def test_trim_to_boundary_keeps_streamed_text():
    assert _trim_to_boundary("One. Two three", 0) == "One."
    assert _trim_to_boundary("One two three", 0) == "One two"
    assert _trim_to_boundary("One two three", 9) == "One two three"[:9]
