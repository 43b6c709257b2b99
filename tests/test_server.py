"""The HTTP server, driven by the official openai client against live servers on 127.0.0.1: replies equal the
engine's own, streams are OpenAI SSE, 16 concurrent streams don't cross, disconnects cancel, bad input gets a 4xx."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from finechat.cli import build_parser, main
from finechat.engine import Completion, Engine, GenerationSettings
from finechat.server import MAX_BODY_BYTES, create_app

MAX_CONCURRENCY = 4


class SlowEngine(Engine):
    """The engine with a pause after each token, so a test can act while a reply is still being generated."""

    def tokens(self, *args, **kwargs):
        for token in super().tokens(*args, **kwargs):
            time.sleep(0.02)
            yield token


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return Engine.load(str(tiny_model_dir))


@pytest.fixture(scope="module")
def url(engine, serve_app) -> str:
    return serve_app(create_app(engine, max_concurrency=MAX_CONCURRENCY, model_id="tiny"))


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def slow_url(engine, serve_app) -> str:
    """A server with one generation slot on the slow engine (at least 20 ms a token)."""
    return serve_app(create_app(SlowEngine(engine.model, engine.tokenizer), max_concurrency=1))


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def reference(engine: Engine, messages, max_tokens: int, **settings) -> Completion:
    """The engine's own greedy reply, generated alone: what the server must send."""
    ids = engine.chat_prompt(messages, trim=False)
    settings = {"stop_at_punctuation": False, **settings}
    return engine.generate(ids, GenerationSettings(max_new_tokens=max_tokens, temperature=0, **settings)).complete()


def health(url: str) -> dict:
    r = httpx.get(f"{url}/health", timeout=5)
    assert r.status_code == 200
    return r.json()


def wait_idle(url: str, within: float) -> float:
    """Seconds until the server has no active or waiting generation; fails after `within`."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        h = health(url)
        if h["active"] == 0 and h["waiting"] == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"server still busy after {within} s: {health(url)}")


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert health(url) == {"status": "ok", "model": "tiny", "active": 0, "waiting": 0, "max_concurrency": 4}


def test_chat_completion_equals_the_engine_reply_with_usage(client, engine):
    want = reference(engine, user("Tell me about cats."), 12)
    assert want.finish_reason == "length" and want.text
    r = client.chat.completions.create(model="tiny", messages=user("Tell me about cats."), max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, 12)
    assert r.usage.total_tokens == want.prompt_tokens + 12


def test_streaming_sends_the_same_text_in_openai_chunks(client, engine):
    want = reference(engine, user("Tell me about cats."), 12)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=user("Tell me about cats."),
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # streamed token by token, not in one piece
    assert "".join(pieces) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_stream_is_server_sent_events_ending_with_done(url):
    body = {"messages": user("hi"), "max_tokens": 4, "temperature": 0, "stream": True}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = r.text.split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    assert all(f.startswith("data: {") for f in frames[:-2])


def test_stop_sequences_cut_the_reply(client, engine):
    full = reference(engine, user("Tell me about dogs."), 24).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    want = full[: full.index(stop)]
    assert 0 < len(want) < len(full)
    kw = {"model": "tiny", "messages": user("Tell me about dogs."), "max_tokens": 24, "temperature": 0}
    r = client.chat.completions.create(**kw, stop=[stop, "never appears"])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want, "stop")
    streamed = "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stop=stop, stream=True)
    )
    assert streamed == want


def test_completions_continue_a_raw_prompt(client, engine):
    ids = engine.text_prompt("The history of")
    want = engine.generate(
        ids, GenerationSettings(max_new_tokens=10, temperature=0, stop_at_punctuation=False)
    ).complete()
    kw = {"model": "tiny", "prompt": "The history of", "max_tokens": 10, "temperature": 0}
    r = client.completions.create(**kw)
    assert r.object == "text_completion"
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want.text, want.finish_reason)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), want.completion_tokens)
    assert "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices) == want.text


def test_length_preset_and_sentence_end_extras(client, engine):
    want = reference(engine, user("Describe the sea."), 100, stop_at_punctuation=True)
    r = client.chat.completions.create(
        model="tiny",
        messages=user("Describe the sea."),
        temperature=0,
        extra_body={"length": "short", "stop_at_punctuation": True},
    )
    assert r.choices[0].message.content == want.text
    assert r.usage.completion_tokens == want.completion_tokens


def test_seeded_sampling_repeats(client):
    kw = {"model": "tiny", "messages": user("Pick a word."), "max_tokens": 8, "temperature": 1.0}
    a, b, c = (client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (7, 7, 8))
    assert a == b != c


def test_sixteen_concurrent_streams_each_get_their_own_reply(client, engine, url):
    prompts = [f"Question {i}: what is {i} plus {i * 3}?" for i in range(16)]
    wants = [reference(engine, user(p), 16).text for p in prompts]
    assert len(set(wants)) >= 8  # distinct replies, so cross-talk would show

    def stream(prompt: str) -> str:
        chunks = client.chat.completions.create(
            model="tiny", messages=user(prompt), max_tokens=16, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks)

    seen, latencies = [], []
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(stream, p) for p in prompts]
        while not all(f.done() for f in futures):
            start = time.monotonic()
            seen.append(health(url))
            latencies.append(time.monotonic() - start)
            time.sleep(0.02)
        got = [f.result() for f in futures]
    assert got == wants
    assert max(latencies) < 2.0  # /health answers while generations run
    assert max(h["active"] for h in seen) == MAX_CONCURRENCY  # bounded by --max-concurrency ...
    assert max(h["waiting"] for h in seen) > 0  # ... and the rest queued
    wait_idle(url, within=5)


def test_stream_disconnect_cancels_generation(slow_url):
    body = {"messages": user("hi"), "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{slow_url}/v1/chat/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()  # kept referenced: a closed line iterator would already close the connection
        while not ('"content": "' in (line := next(lines)) and '"role"' not in line):
            pass  # until one token has arrived
        assert health(slow_url)["active"] == 1
    # The block closed the connection. 400 tokens at >= 20 ms each would take >= 8 s; a cancelled reply stops at once.
    assert wait_idle(slow_url, within=3) < 3


def test_non_streaming_and_queued_disconnects_cancel(slow_url):
    body = {"messages": user("hi"), "max_tokens": 400, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, f"{slow_url}/v1/chat/completions", json=body, timeout=1.0)
        time.sleep(0.3)
        queued = pool.submit(httpx.post, f"{slow_url}/v1/chat/completions", json=body, timeout=0.5)
        for f in (running, queued):
            with pytest.raises(httpx.ReadTimeout):
                f.result()
    assert wait_idle(slow_url, within=3) < 3
    r = httpx.post(f"{slow_url}/v1/chat/completions", json={**body, "max_tokens": 3}, timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BAD_REQUESTS = {
    "invalid JSON": (CHAT, b'{"messages": [', 400, "request body is not valid JSON"),
    "not an object": (CHAT, b"[1, 2]", 400, "request body must be a JSON object, got list"),
    "missing messages": (CHAT, {"max_tokens": 5}, 400, "messages: field required"),
    "empty messages": (CHAT, {"messages": []}, 400, "messages: must not be empty"),
    "unknown role": (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "unknown role 'wizard'"),
    "content not text": (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content: must be"),
    "prompt longer than the window": (CHAT, {"messages": user("word " * 2000)}, 400, "the context window is 512"),
    "max_tokens beyond the window": (
        CHAT,
        {"messages": user("hi"), "max_tokens": 5000},
        400,
        "max_tokens is 5000 but the model's context window is 512 tokens",
    ),
    "prompt + max_tokens beyond the window": (
        CHAT,
        {"messages": user("word " * 100), "max_tokens": 500},
        400,
        "the reply may need 500 more, but the context window is 512",
    ),
    "max_tokens zero": (CHAT, {"messages": user("hi"), "max_tokens": 0}, 400, "max_tokens: input should be greater"),
    "negative temperature": (CHAT, {"messages": user("hi"), "temperature": -1}, 400, "temperature: input should be"),
    "stop not text": (CHAT, {"messages": user("hi"), "stop": 5}, 400, "stop: must be a string or a list of strings"),
    "several choices": (CHAT, {"messages": user("hi"), "n": 2}, 400, "n: only one choice per request"),
    "unknown length": (CHAT, {"messages": user("hi"), "length": "huge"}, 400, "unknown length preset 'huge'"),
    "seed out of range": (CHAT, {"messages": user("hi"), "seed": 2**70}, 400, "seed: input should be less than"),
    "lone surrogate": (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "not valid Unicode"),
    "empty completion prompt": (COMPLETIONS, {"prompt": ""}, 400, "prompt is empty"),
    "token-id prompt": (COMPLETIONS, {"prompt": [1, 2, 3]}, 400, "prompt: must be a string"),
    "completion prompt too long": (COMPLETIONS, {"prompt": "word " * 2000}, 400, "the context window is 512"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_an_openai_error_and_the_server_lives(url, case):
    path, body, status, message = BAD_REQUESTS[case]
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{url}{path}", **kw, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error["message"]
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}
    assert health(url)["status"] == "ok"


def test_oversized_body_is_refused_with_413(url):
    big = b'{"messages": [{"role": "user", "content": "' + b"x" * MAX_BODY_BYTES + b'"}]}'
    declared = httpx.post(f"{url}{CHAT}", content=big, timeout=30)

    def chunked():  # no Content-Length: the limit must hold while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    streamed = httpx.post(f"{url}{CHAT}", content=chunked(), timeout=30)
    for r in (declared, streamed):
        assert r.status_code == 413
        assert f"request body is larger than {MAX_BODY_BYTES} bytes" in r.json()["error"]["message"]
    assert health(url)["status"] == "ok"


def test_unknown_path_and_method_get_openai_errors(url):
    r = httpx.get(f"{url}/v1/engines")
    assert r.status_code == 404 and "the API is under /v1" in r.json()["error"]["message"]
    r = httpx.get(f"{url}{CHAT}")
    assert r.status_code == 405 and "Method Not Allowed" in r.json()["error"]["message"]


def test_openai_client_raises_with_the_server_message(client):
    with pytest.raises(openai.BadRequestError, match="unknown role 'wizard'"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "hi"}])


def test_api_key_is_required_on_the_api(engine, serve_app):
    url = serve_app(create_app(engine, api_key="s3cret"))
    body = {"messages": user("hi"), "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        r = httpx.post(f"{url}{CHAT}", json=body, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key" and "--api-key" in r.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
    # greedy: with the API's default temperature 1 the tiny model may sample a sentence end or EOS first
    reply = good.chat.completions.create(model="m", messages=user("hi"), max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens == 2
    assert health(url)["status"] == "ok" and httpx.get(f"{url}/").status_code == 200  # page and health stay open


def test_chat_page_is_served_with_no_outside_references(url):
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "style.css"):
        asset = httpx.get(f"{url}/web/{name}")
        assert asset.status_code == 200 and f"/web/{name}" in page.text
        assert "://" not in asset.text  # no CDN: the page works offline
    assert "://" not in page.text


def test_cli_serve_defaults_to_localhost():
    args = build_parser().parse_args(["serve", "--model", "smollm2"])
    assert (args.host, args.port, args.api_key, args.max_concurrency) == ("127.0.0.1", 8000, None, 4)


def test_cli_serve_taken_port_is_a_one_line_error(capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "no-such-model", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"--port {port}: cannot listen there" in err and len(err.strip().splitlines()) == 1


def test_cli_serve_needs_one_slot(capsys):
    assert main(["serve", "--model", "smollm2", "--max-concurrency", "0"]) == 2
    assert "--max-concurrency must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_finechat_serve_smollm2_answers_the_openai_client(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("w")
    cmd = [sys.executable, "-m", "finechat", "serve", "--model", "smollm2", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # the first use converts the GGUF
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline, "server did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        kw = {
            "model": "smollm2",
            "messages": user("What is the capital of France?"),
            "max_tokens": 40,
            "temperature": 0,
        }
        reply = client.chat.completions.create(**kw)
        assert "Paris" in reply.choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**kw, stream=True))
        assert streamed == reply.choices[0].message.content
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()
