import io

from finechat.chat import chat
from finechat.engine import Engine, GenerationSettings


def test_chat_commands_and_history(tiny_model_dir):
    engine = Engine.load(str(tiny_model_dir))
    seen = []
    original = engine.chat_prompt

    def recording_prompt(messages, reserve=0, trim=True):
        seen.append((list(messages), reserve))
        return original(messages, reserve=reserve, trim=trim)

    engine.chat_prompt = recording_prompt  # our own object: record what the chat sends
    inp = io.StringIO("Hello\n/length short\nSecond\n/length enormous\n/reset\nThird\n/bogus\n/quit\nnever read\n")
    out = io.StringIO()
    chat(
        engine, GenerationSettings(max_new_tokens=250, stop_at_punctuation=False), system="Be brief.", inp=inp, out=out
    )
    text = out.getvalue()
    assert "(replies up to about 100 tokens)" in text
    assert "unknown preset" in text and "(conversation cleared)" in text and "unknown command /bogus" in text
    (m1, r1), (m2, r2), (m3, r3) = seen
    assert [m["role"] for m in m1] == ["system", "user"] and r1 == 250
    assert [m["role"] for m in m2] == ["system", "user", "assistant", "user"] and r2 == 100
    assert [m["content"] for m in m3] == ["Be brief.", "Third"]  # /reset kept only the system message
    assert text.count("bot> ") == 3


def test_chat_ends_at_end_of_input(tiny_model_dir):
    out = io.StringIO()
    chat(Engine.load(str(tiny_model_dir)), GenerationSettings(max_new_tokens=5), inp=io.StringIO(""), out=out)
    assert out.getvalue().startswith("finechat")
