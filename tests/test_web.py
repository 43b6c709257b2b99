"""The chat page in a real browser: Debian's chromium, headless, driven by Playwright. It loads from the server alone,
streams replies, keeps the conversation, sends the length preset, stops a reply (the server cancels it) and clears."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from finechat.engine import Engine
from finechat.server import create_app

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class SlowEngine(Engine):
    """The engine with a pause after each token, so the page is still streaming when the test looks."""

    def tokens(self, *args, **kwargs):
        for token in super().tokens(*args, **kwargs):
            time.sleep(0.02)
            yield token


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing; install it with: apt-get update && apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 900, "height": 700})
    # Only the server itself may be reached: proof that the page needs no CDN.
    context.route(lambda url: not url.startswith("http://127.0.0.1:"), lambda route: route.abort())
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, errors


def sent_bodies(page) -> list[dict]:
    """Bodies of the chat requests the page makes, in order."""
    bodies: list[dict] = []
    page.on(
        "request",
        lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/v1/chat/completions") else None,
    )
    return bodies


def test_page_streams_keeps_history_stops_and_clears(tiny_model_dir, serve_app, page):
    engine = Engine.load(str(tiny_model_dir))
    url = serve_app(create_app(SlowEngine(engine.model, engine.tokenizer), model_id="tiny"))
    bodies = sent_bodies(page)
    page.goto(url)
    expect(page.locator("#model")).to_have_text("tiny")

    page.select_option("#length", "long")
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").last
    expect(reply).not_to_have_text("")
    first = reply.inner_text()
    expect(reply).not_to_have_text(first)  # still growing: the reply streams in
    assert page.locator("#stop").is_visible() and not page.locator("#send").is_visible()
    assert httpx.get(f"{url}/health").json()["active"] == 1

    page.click("#stop")
    expect(reply.locator(".note")).to_be_visible()
    assert reply.locator(".note").inner_text() == "stopped"
    assert page.locator("#send").is_visible()
    deadline = time.monotonic() + 3  # 500 tokens at >= 20 ms each: only a cancel ends it this soon
    while httpx.get(f"{url}/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{url}/health").json()["active"] == 0
    partial = reply.inner_text().removesuffix("stopped").strip()
    assert partial

    page.select_option("#length", "short")
    page.fill("#input", "Go on")
    page.press("#input", "Enter")
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(page.locator("#send")).to_be_visible(timeout=30000)
    assert [b["length"] for b in bodies] == ["long", "short"]
    assert bodies[0]["stream"] is True and bodies[0]["messages"] == [{"role": "user", "content": "Hello there"}]
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"].strip() == partial

    page.click("#clear")
    assert page.locator(".msg").count() == 0
    page.fill("#input", "Fresh start")
    page.press("#input", "Enter")
    expect(page.locator("#send")).to_be_visible(timeout=30000)
    assert bodies[2]["messages"] == [{"role": "user", "content": "Fresh start"}]


def test_page_shows_server_errors(tiny_model_dir, serve_app, page):
    url = serve_app(create_app(Engine.load(str(tiny_model_dir)), model_id="tiny"))
    page.goto(url)
    page.fill("#input", "word " * 2000)  # longer than the 512-token context window
    page.press("#input", "Enter")
    error = page.locator(".msg.error")
    error.wait_for()
    assert "context window is 512" in error.inner_text()
    assert page.locator("#send").is_visible()


@pytest.mark.slow
def test_page_talks_to_smollm2(serve_app, page, tmp_path):
    url = serve_app(create_app(Engine.load("smollm2"), model_id="smollm2"))
    page.goto(url)
    page.select_option("#length", "short")
    for i, question in enumerate(["What is the capital of France?", "And what is it famous for?"]):
        page.fill("#input", question)
        page.press("#input", "Enter")
        expect(page.locator(".msg.assistant")).to_have_count(i + 1)
        expect(page.locator("#send")).to_be_visible(timeout=120000)
    replies = page.locator(".msg.assistant").all_inner_texts()
    assert "Paris" in replies[0] and len(replies[1]) > 20
    page.screenshot(path=tmp_path / "serve-page.png")
    if os.environ.get("FINECHAT_SCREENSHOT"):  # FINECHAT_SCREENSHOT=docs/serve-page.png refreshes the README's picture
        shutil.copy(tmp_path / "serve-page.png", os.environ["FINECHAT_SCREENSHOT"])
