"""Terminal front ends of the engine: one-shot `finechat generate` and the interactive `finechat chat`."""

from __future__ import annotations

import sys
from typing import TextIO

from finechat.engine import LENGTH_PRESETS, Engine, GenerationSettings, length_tokens
from finechat.errors import UserError

HELP = "commands: /reset (forget the conversation), /length NAME (" + "|".join(LENGTH_PRESETS) + "), /quit"


def generate(engine: Engine, prompt: str, settings: GenerationSettings, out: TextIO | None = None) -> str:
    """Reply to one user message, streaming the text to out (stdout); returns the reply."""
    return _stream_reply(engine, [{"role": "user", "content": prompt}], settings, out or sys.stdout)


def _stream_reply(engine: Engine, messages: list[dict[str, str]], settings: GenerationSettings, out: TextIO) -> str:
    """Generate a reply to a conversation, writing it to out piece by piece; returns the whole reply."""
    generation = engine.generate(engine.chat_prompt(messages, reserve=settings.max_new_tokens), settings)
    for piece in generation:
        out.write(piece)
        out.flush()
    out.write("\n")
    assert generation.result is not None
    return generation.result.text


def chat(
    engine: Engine,
    settings: GenerationSettings,
    system: str | None = None,
    inp: TextIO | None = None,
    out: TextIO | None = None,
) -> None:
    """The seed's chatbot: streamed replies, history through the chat template, /reset, /length, /quit."""
    inp, out = inp or sys.stdin, out or sys.stdout
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    length = next((k for k, v in LENGTH_PRESETS.items() if v == settings.max_new_tokens), str(settings.max_new_tokens))
    out.write(f"finechat — {HELP}\n")
    while True:
        out.write(f"\n[{length}] you> ")
        out.flush()
        line = inp.readline()
        if not line:  # end of input
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/quit", "/exit"):
                return
            if cmd == "/reset":
                history = history[:1] if system else []
                out.write("(conversation cleared)\n")
            elif cmd == "/length":
                try:
                    settings.max_new_tokens = length_tokens(arg.strip())
                    length = arg.strip()
                    out.write(f"(replies up to about {settings.max_new_tokens} tokens)\n")
                except UserError as e:
                    out.write(f"({e})\n")
            else:
                out.write(f"(unknown command {cmd}; {HELP})\n")
            continue
        history.append({"role": "user", "content": text})
        out.write("bot> ")
        try:
            reply = _stream_reply(engine, history, settings, out)
        except UserError as e:
            history.pop()
            out.write(f"({e})\n")
            continue
        history.append({"role": "assistant", "content": reply})
