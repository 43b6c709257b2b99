"""The one generation engine: chat prompts with history trimming, token streaming, sampling, stop strings, length
presets and the stop-at-sentence-end criterion. `generate`, `chat` and `serve` all generate through it.

Tokens come from the fast decoder (finechat.decode: static KV cache, CUDA graphs on a GPU) through the continuous
batcher (finechat.batching), which decodes concurrent generations together; models it does not cover, and requests
longer than its cache slots, are decoded step by step with a DynamicCache."""

from __future__ import annotations

import inspect
import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finechat.errors import UserError

if TYPE_CHECKING:
    from finechat.batching import Batcher

log = logging.getLogger(__name__)

LENGTH_PRESETS = {"short": 100, "medium": 250, "long": 500, "very-long": 20000}
# How many tokens before the soft limit streaming switches to whole sentences (the longest sentence the criterion
# can still cut back to without having streamed past it).
HOLD_TOKENS = 48
# A sentence ends at . ! ? (or the ellipsis) plus any closing quotes/brackets, and is followed by whitespace, so
# "3.5" or "e.g" mid-token never counts.
SENTENCE_END = re.compile(r"[.!?…][\"'”’»)\]]*(?=\s)")


def length_tokens(name: str) -> int:
    """New-token budget of a length preset name."""
    if name not in LENGTH_PRESETS:
        raise UserError(f"--length {name}: unknown preset; use one of {', '.join(LENGTH_PRESETS)}")
    return LENGTH_PRESETS[name]


@dataclass
class GenerationSettings:
    """How one reply is generated."""

    max_new_tokens: int = LENGTH_PRESETS["medium"]
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # End at a sentence end once the budget is nearly spent, going a little past it rather than cutting a sentence.
    stop_at_punctuation: bool = True

    def limits(self) -> tuple[int, int]:
        """(soft, hard) token counts: sentence ends stop the reply from soft on; hard always stops it."""
        n = self.max_new_tokens
        if not self.stop_at_punctuation:
            return n, n
        return max(1, n - max(1, n // 10)), n + max(16, n // 4)


@dataclass
class Completion:
    """The finished reply."""

    text: str
    finish_reason: str  # "stop" (EOS, stop string, sentence end), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int


class Generation:
    """An in-progress reply: iterate for text pieces; `result` holds the Completion once iteration ends."""

    def __init__(
        self, engine: Engine, prompt_ids: list[int], settings: GenerationSettings, cancel: threading.Event | None
    ):
        self.engine, self.prompt_ids, self.settings = engine, prompt_ids, settings
        self.cancel = cancel or threading.Event()
        self.result: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        s = self.settings
        soft, _ = s.limits()
        hard = self.engine.reply_limit(s, len(self.prompt_ids))
        detok = _Detokenizer(self.engine.tokenizer)
        text, emitted, n, finish = "", 0, 0, "length"
        for token in self.engine.tokens(self.prompt_ids, s, self.cancel):
            if token is None:
                finish = "cancelled"
                break
            n += 1
            if token in self.engine.eos_ids:
                finish = "stop"
                break
            text += detok.add(token)
            end = _first_stop(text, s.stop)
            if end is not None:
                text, finish = text[:end], "stop"
                break
            if s.stop_at_punctuation and n >= soft:
                m = _sentence_end_after(text, emitted)
                if m is not None:
                    text, finish = text[:m], "stop"
                    break
            if n >= hard:
                break
            safe = len(text) - _stop_prefix_len(text, s.stop)
            if s.stop_at_punctuation and n >= soft - HOLD_TOKENS:
                # Near the end, stream whole sentences only, so that a reply that runs out of tokens can still be
                # cut back to a sentence end that was never streamed past.
                safe = min(safe, _last_sentence_end(text, emitted))
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        if finish == "length" and s.stop_at_punctuation:
            text = _trim_to_boundary(text, emitted)
        if len(text) > emitted:
            yield text[emitted:]
        self.result = Completion(text, finish, len(self.prompt_ids), n)

    def complete(self) -> Completion:
        """Run to the end and return the Completion."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


class Engine:
    """A loaded model and tokenizer that turn prompts into replies."""

    def __init__(self, model, tokenizer, max_batch: int = 1, graphs: bool | None = None, fused: str = "auto"):
        self.model, self.tokenizer = model, tokenizer
        from finechat.models import context_window

        self.context_window = context_window(model, tokenizer)
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, tokenizer.eos_token_id] if i is not None}
        # One forward pass at a time: the batcher's steps and step-by-step decoding take turns.
        self.lock = threading.Lock()
        self.max_batch = max_batch  # generations decoded together; more wait for a free slot
        self.graphs = self.device.type == "cuda" if graphs is None else graphs  # CUDA graphs of the decode steps
        self.fused = fused  # fused decode kernels: auto (when bit-for-bit the model's modules), on, off
        self.batcher: Batcher | None = None
        self.fast_off: str | None = None  # why the fast decoder is not used, once warm_up has decided
        self.warmup_s = 0.0
        self._setup = threading.Lock()
        self._ready = False

    @classmethod
    def load(cls, spec: str, quantize: str = "none", compute_dtype: str = "auto", max_batch: int = 1) -> Engine:
        """Load a model spec (Hub id, folder, .gguf, run folder, smollm2) for generation, warmed up for `max_batch`
        concurrent generations."""
        from finechat.models import load_for_inference

        model, tokenizer = load_for_inference(spec, quantize=quantize, compute_dtype=compute_dtype)
        engine = cls(model, tokenizer, max_batch=max_batch)
        engine.warm_up()
        return engine

    def warm_up(self) -> float:
        """Set up fast decoding now (KV cache, CUDA graph capture) so that no reply waits for it; returns seconds."""
        import torch

        from finechat.batching import Batcher
        from finechat.decode import MIN_CAPACITY, Decoder, avoid_cudnn_attention, plan_capacity, unsupported_reason

        with self._setup:
            if self._ready:
                return 0.0
            start = time.perf_counter()
            if self.device.type == "cuda" and avoid_cudnn_attention():
                log.info("cuDNN attention off for this process: it plans anew for every sequence length")
            reason = unsupported_reason(self.model)
            capacity = 0 if reason else plan_capacity(self.model, self.max_batch, self.context_window)
            if not reason and capacity < MIN_CAPACITY:
                reason = f"a KV cache of {self.max_batch} x {MIN_CAPACITY} positions does not fit in memory"
            if reason:
                log.info("fast decoding off (%s): decoding step by step", reason)
            else:
                with self.lock, torch.inference_mode():
                    decoder = Decoder(self.model, self.max_batch, capacity, fused=self.fused)
                    if self.graphs:
                        decoder.capture()
                self.batcher = Batcher(decoder, self.eos_ids, self.lock)
                log.info(
                    "fast decoding: %d slot(s) of %d positions, %s, fused kernels %s (%s), "
                    "one k/v product %s (%s), one-row NF4 product %s, batched NF4 product %s",
                    self.max_batch,
                    capacity,
                    "CUDA graphs" if decoder.graphs else "eager",
                    "on" if decoder.fused else "off",
                    decoder.fused_check,
                    "on" if decoder.kv_weights is not None else "off",
                    decoder.kv_check,
                    decoder.nf4_one_check,
                    decoder.nf4_summary,
                )
            self.fast_off, self._ready = reason, True
            self.warmup_s = time.perf_counter() - start
            return self.warmup_s

    def ensure_batch(self, n: int) -> None:
        """Make room for n generations decoding together (warming up again if the cache was built for fewer)."""
        with self._setup:
            if n <= self.max_batch:
                return
            self.max_batch = n
            rebuild = self._ready
        if rebuild:
            self.close()
            self.warm_up()

    def close(self) -> None:
        """Stop the decoding thread and free the KV cache (the engine warms up again if used later)."""
        with self._setup:
            if self.batcher is not None:
                self.batcher.close()
            self.batcher, self._ready = None, False

    def reply_limit(self, settings: GenerationSettings, prompt_tokens: int) -> int:
        """Most tokens a reply may take: the settings' hard limit, within the context window."""
        return min(settings.limits()[1], self.context_window - prompt_tokens)

    def count(self, text: str) -> int:
        """Number of tokens in a text (no special tokens)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def text_prompt(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt."""
        return list(self.tokenizer(text)["input_ids"])

    def chat_prompt(self, messages: list[dict[str, str]], reserve: int = 0, trim: bool = True) -> list[int]:
        """Token ids of a conversation through the chat template, leaving `reserve` positions for the reply.

        With trim, the oldest turns (never the system message or the last one) are dropped until it fits."""
        messages = list(messages)
        reserve = min(reserve, self.context_window // 2) if trim else reserve
        while True:
            ids = self._template(messages)
            if len(ids) + max(reserve, 1) <= self.context_window:
                return ids
            first = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
            if not trim or first >= len(messages) - 1:
                raise UserError(
                    f"prompt is {len(ids)} tokens and the reply needs {max(reserve, 1)} more, but the context window is "
                    f"{self.context_window}; shorten the messages or lower max_tokens"
                )
            del messages[first]
            while first < len(messages) - 1 and messages[first]["role"] != "user":
                del messages[first]

    def _template(self, messages: list[dict[str, str]]) -> list[int]:
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def generate(
        self, prompt_ids: list[int], settings: GenerationSettings, cancel: threading.Event | None = None
    ) -> Generation:
        """A reply to stream (iterate) or finish (`.complete()`)."""
        if settings.max_new_tokens <= 0:
            raise UserError(f"max new tokens must be positive, got {settings.max_new_tokens}")
        if len(prompt_ids) >= self.context_window:
            raise UserError(f"prompt is {len(prompt_ids)} tokens; the context window is {self.context_window}")
        return Generation(self, prompt_ids, settings, cancel)

    def tokens(
        self, prompt_ids: list[int], settings: GenerationSettings, cancel: threading.Event
    ) -> Iterator[int | None]:
        """Token ids one at a time; None once cancelled."""
        if cancel.is_set():
            yield None
            return
        self.warm_up()
        limit = self.reply_limit(settings, len(prompt_ids))
        batcher = self.batcher
        if batcher is None or not batcher.fits(len(prompt_ids) + limit):
            yield from self._tokens_stepwise(prompt_ids, settings, cancel, limit)
            return
        from finechat.batching import END, Request

        request = Request(prompt_ids, limit, _sampler(settings, self.device), cancel)
        batcher.submit(request)
        try:
            while not cancel.is_set():
                item = request.out.get()
                if item is END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item is None:
                    return
            yield None
        finally:
            batcher.leave(request)

    def _tokens_stepwise(
        self, prompt_ids: list[int], settings: GenerationSettings, cancel: threading.Event, limit: int
    ) -> Iterator[int | None]:
        """Prefill, then one DynamicCache step per token (up to `limit` or EOS), taking turns under the lock."""
        import torch
        from transformers import DynamicCache

        pick = _sampler(settings, self.device)
        cache = DynamicCache(config=self.model.config)
        # Only the last position's logits, as generate computes them (where the model's forward can be told so).
        last = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        inputs = torch.tensor([prompt_ids], device=self.device)
        for _ in range(limit):
            if cancel.is_set():
                yield None
                return
            with self.lock, torch.inference_mode():
                logits = self.model(input_ids=inputs, past_key_values=cache, use_cache=True, **last).logits
                scores = logits[:, -1, :].float()
                token = int(pick(scores) if pick else scores.argmax(-1)[0])
            yield token
            if token in self.eos_ids:
                return
            inputs = torch.tensor([[token]], device=self.device)


def _sampler(settings: GenerationSettings, device: Any):
    """None for greedy decoding; else a function scores [1, vocab] -> sampled token id (a tensor), applying
    temperature and top-p with a per-request generator."""
    import torch
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    if settings.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(settings.seed if settings.seed is not None else torch.seed())
    warpers = LogitsProcessorList([TemperatureLogitsWarper(settings.temperature)])
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(settings.top_p))
    no_ids = torch.zeros(1, 0, dtype=torch.long, device=device)  # the warpers take input ids but ignore them

    def pick(scores):
        probs = torch.softmax(warpers(no_ids, scores), dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[0, 0]

    return pick


class _Detokenizer:
    """Incremental decoding that emits only complete characters (multi-token UTF-8 waits for its last token)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _sentence_end_after(text: str, emitted: int) -> int | None:
    """End of the first sentence end at or after the streamed part (so streamed text is never taken back)."""
    for m in SENTENCE_END.finditer(text, max(0, emitted - 8)):
        if m.end() >= emitted:
            return m.end()
    return None


def _last_sentence_end(text: str, emitted: int) -> int:
    """End of the last sentence end at or after the streamed part, or the streamed part's end when there is none."""
    ends = [m.end() for m in SENTENCE_END.finditer(text, max(0, emitted - 8)) if m.end() >= emitted]
    return ends[-1] if ends else emitted


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that could still become a stop string (held back from the stream)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _trim_to_boundary(text: str, emitted: int) -> str:
    """Cut a reply that ran out of tokens back to its last sentence end, or at least to a word end; text already
    streamed stays."""
    ends = [m.end() for m in SENTENCE_END.finditer(text + " ") if m.end() >= emitted]
    if ends:
        return text[: ends[-1]]
    cut = max(text.rfind(" "), text.rfind("\n"))
    return text[: max(cut, emitted)].rstrip() if cut > emitted else text[:emitted]
