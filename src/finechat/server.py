"""The HTTP server: an OpenAI-compatible API (chat completions, completions, models, health) and the offline chat
page, generating through the one engine in worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from finechat.engine import LENGTH_PRESETS, Engine, Generation, GenerationSettings
from finechat.errors import UserError

log = logging.getLogger("finechat.server")

WEB_DIR = Path(__file__).parent / "web"
MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than any context window holds, small enough to refuse floods early
ROLES = ("system", "developer", "user", "assistant")
# Self-contained page: everything comes from this server, so it works offline and no CDN can inject script.
PAGE_POLICY = "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self' data:"


class ApiError(Exception):
    """A refused request: sent as an OpenAI-style error object with a 4xx status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        """The error as an HTTP response."""
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---------------------------------------------------------------------------------------------------------------------
# Requests


class _Sampling(BaseModel):
    """Fields shared by chat completions and completions; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)  # the newer OpenAI name for max_tokens
    temperature: float = Field(1.0, ge=0, le=2)  # OpenAI's default; 0 is greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    length: str | None = None  # finechat extra: a length preset instead of max_tokens
    stop_at_punctuation: bool = False  # finechat extra: the chat command's sentence-end stopping

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only one choice per request is supported, got n={n}; send n=1 or leave it out")
        return n

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_strings(cls, stop: Any) -> Any:
        if not (
            stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
        ):
            raise ValueError("must be a string or a list of strings")
        return stop

    @field_validator("length")
    @classmethod
    def _known_length(cls, name: str | None) -> str | None:
        if name is not None and name not in LENGTH_PRESETS:
            raise ValueError(f"unknown length preset {name!r}; use one of {', '.join(LENGTH_PRESETS)}")
        return name

    def stops(self) -> list[str]:
        """Stop strings as a list."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def token_limit(self) -> int | None:
        """The explicit max_tokens (either name), if any."""
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class ChatMessage(BaseModel):
    """One conversation turn; content is a string or OpenAI text parts."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]]

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, str):
            return content
        if not isinstance(content, list) or not all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
        ):
            raise ValueError('must be a string or a list of text parts ({"type": "text", "text": "..."})')
        return content

    def as_template(self) -> dict[str, str]:
        """The turn as the chat template takes it."""
        text = self.content if isinstance(self.content, str) else "".join(p["text"] for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("must not be empty; send at least one message")
        return messages


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ValueError("must be a string (or a list holding one string); token-id prompts are not supported")
        return prompt


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, refusing bodies over `limit` bytes before reading them whole."""
    # Not FastAPI's max_body_size: it answers a declared oversize body in plain text, not an OpenAI error object.
    too_large = ApiError(
        413, f"request body is larger than {limit} bytes; send shorter messages", code="body_too_large"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"request body is not valid JSON ({e}); send a JSON object", code="invalid_json") from e
    try:  # a lone UTF-16 surrogate escape is valid JSON, but no tokenizer can encode it
        json.dumps(data, ensure_ascii=False).encode()
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end]
        raise ApiError(400, f"request body holds {bad!r}, which is not valid Unicode; send UTF-8 text") from e
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    return data


_Body = TypeVar("_Body", bound=BaseModel)


def _parse(model: type[_Body], data: dict[str, Any]) -> _Body:
    """Validate a body against a request model; the first problem becomes a 400 naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{param}: {msg[:1].lower()}{msg[1:]}", param=param or None) from e


# ---------------------------------------------------------------------------------------------------------------------
# Generation in worker threads

_END = object()


class Scheduler:
    """Runs generations in worker threads, at most `max_concurrency` at once; later requests wait their turn."""

    def __init__(self, max_concurrency: int):
        self.max_concurrency = max_concurrency
        self.pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="finechat-generate")
        self.slots = asyncio.Semaphore(max_concurrency)
        self.active = 0
        self.waiting = 0
        self.cancels: set[threading.Event] = set()

    async def pieces(self, request: Request, generation: Generation) -> AsyncIterator[str]:
        """Text pieces of a generation; it is cancelled when the client disconnects."""
        cancel = generation.cancel
        # Watch for the disconnect ourselves: a queued request has sent nothing yet, so no failed write would notice.
        watcher = asyncio.create_task(_on_disconnect(request, cancel.set))
        try:
            self.waiting += 1
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Any] = asyncio.Queue()
            self.active += 1
            self.cancels.add(cancel)
            try:
                future = self.pool.submit(_drain, generation, loop, queue)
            except BaseException:
                self._release(cancel)
                raise
            # The slot is freed when the thread really stops, not when the client leaves: the engine is busy until then.
            future.add_done_callback(lambda _: _call_soon(loop, self._release, cancel))
            while (item := await queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            watcher.cancel()

    def _release(self, cancel: threading.Event) -> None:
        self.active -= 1
        self.cancels.discard(cancel)
        self.slots.release()

    def close(self) -> None:
        """Cancel every generation and stop the threads (at server shutdown)."""
        for cancel in list(self.cancels):
            cancel.set()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _drain(generation: Generation, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
    """Worker thread: run the generation, handing each piece to the event loop."""
    try:
        for piece in generation:
            _call_soon(loop, queue.put_nowait, piece)
    except BaseException as e:
        _call_soon(loop, queue.put_nowait, e)
    else:
        _call_soon(loop, queue.put_nowait, _END)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    # A closed loop means the server is shutting down and nobody is waiting for the item.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn, *args)


async def _on_disconnect(request: Request, callback: Callable[[], None]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    callback()


# ---------------------------------------------------------------------------------------------------------------------
# The app


def create_app(
    engine: Engine,
    api_key: str | None = None,
    max_concurrency: int = 4,
    model_id: str = "finechat",
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The server as an ASGI app around a loaded engine."""
    if max_concurrency < 1:
        raise UserError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    engine.ensure_batch(max_concurrency)  # the engine decodes every admitted generation in one batch
    scheduler = Scheduler(max_concurrency)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    app = FastAPI(
        title="finechat",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(
                401,
                "missing or wrong API key; send the server's --api-key as 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.get("/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": started, "owned_by": "finechat"}],
        }

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = _parse(ChatRequest, await _read_json(request, max_body_bytes))
        limit = _check_limit(engine, req)
        ids = await run_in_threadpool(_chat_ids, engine, [m.as_template() for m in req.messages])
        return await answer(request, req, ids, limit)

    @api.post("/completions")
    async def completions(request: Request) -> Response:
        req = _parse(CompletionRequest, await _read_json(request, max_body_bytes))
        limit = _check_limit(engine, req)
        ids = await run_in_threadpool(engine.text_prompt, req.prompt)
        if not ids:
            raise ApiError(400, "prompt is empty; send some text to continue", param="prompt")
        return await answer(request, req, ids, limit)

    async def answer(request: Request, req: _Sampling, ids: list[int], limit: int | None) -> Response:
        """Generate the reply and send it whole or as a stream, in the chat or the text-completion shape."""
        chat = isinstance(req, ChatRequest)
        generation = engine.generate(ids, _settings(engine, req, len(ids), limit))
        pieces = scheduler.pieces(request, generation)
        head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model_id,
        }
        if req.stream:

            async def chunks() -> AsyncIterator[dict[str, Any]]:
                chunk = {**head, "object": "chat.completion.chunk"} if chat else head
                if chat:
                    yield {**chunk, "choices": [_delta({"role": "assistant", "content": ""})]}
                async for piece in pieces:
                    yield {**chunk, "choices": [_delta({"content": piece}) if chat else _text(piece)]}
                finish = _finish(generation)
                yield {**chunk, "choices": [_delta({}, finish) if chat else _text("", finish)]}
                if (req.stream_options or {}).get("include_usage"):
                    yield {**chunk, "choices": [], "usage": _usage(generation)}

            return _sse(chunks())
        text = "".join([piece async for piece in pieces])
        finish = _finish(generation)
        if finish == "cancelled":
            return Response(status_code=499)  # nginx's "client closed request"; nobody is left to read it
        choice = _message(text, finish) if chat else _text(text, finish)
        return JSONResponse({**head, "choices": [choice], "usage": _usage(generation)})

    app.include_router(api)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": model_id,
            "active": scheduler.active,
            "waiting": scheduler.waiting,
            "max_concurrency": scheduler.max_concurrency,
        }

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code == 404:
            message += "; the API is under /v1 (GET /v1/models, POST /v1/chat/completions, POST /v1/completions)"
        return ApiError(e.status_code, message).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return ApiError(400, f"invalid request: {e.errors()[0].get('msg', e)}").response()

    @app.exception_handler(UserError)
    async def user_error(request: Request, e: UserError) -> JSONResponse:
        return ApiError(400, str(e)).response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(500, f"internal error: {e}", kind="server_error").response()

    return app


def _check_limit(engine: Engine, req: _Sampling) -> int | None:
    """The explicit token limit, refused up front when no prompt could leave room for it."""
    limit = req.token_limit()
    if limit is not None and limit >= engine.context_window:
        raise ApiError(
            400,
            f"max_tokens is {limit} but the model's context window is {engine.context_window} tokens, prompt included; "
            "lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return limit


def _chat_ids(engine: Engine, messages: list[dict[str, str]]) -> list[int]:
    """Prompt token ids of a conversation (no trimming: a conversation that does not fit is refused)."""
    from jinja2 import TemplateError

    try:
        return engine.chat_prompt(messages, reserve=1, trim=False)
    except UserError as e:
        raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from e
    except TemplateError as e:
        raise ApiError(400, f"the model's chat template refused these messages: {e}", param="messages") from e


def _settings(engine: Engine, req: _Sampling, prompt_tokens: int, limit: int | None) -> GenerationSettings:
    """Generation settings of a request; the budget is max_tokens, else the length preset, else the room left."""
    room = engine.context_window - prompt_tokens
    if room < 1 or (limit is not None and limit > room):
        raise ApiError(
            400,
            f"prompt is {prompt_tokens} tokens and the reply may need {limit or 1} more, but the context window is "
            f"{engine.context_window}; shorten the prompt or lower max_tokens",
            param="messages" if isinstance(req, ChatRequest) else "prompt",
            code="context_length_exceeded",
        )
    budget = limit if limit is not None else min(LENGTH_PRESETS[req.length], room) if req.length else room
    return GenerationSettings(
        max_new_tokens=budget,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=req.stops(),
        stop_at_punctuation=req.stop_at_punctuation,
    )


def _finish(generation: Generation) -> str:
    assert generation.result is not None
    return generation.result.finish_reason


def _usage(generation: Generation) -> dict[str, int]:
    assert generation.result is not None
    r = generation.result
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


def _delta(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _message(text: str, finish: str) -> dict[str, Any]:
    return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}


def _text(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _sse(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events in OpenAI's framing, ending with `data: [DONE]`; a failure mid-stream becomes an error event."""

    async def frames() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except Exception as e:  # headers are sent: the error can only travel as an event
            log.exception("generation failed")
            error = {"message": f"generation failed: {e}", "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


# ---------------------------------------------------------------------------------------------------------------------
# Running it


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a UserError naming the flag to change."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: not a TCP port; use a number from 1 to 65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:
        raise UserError(
            f"--host {host} --port {port}: cannot listen there ({e.strerror}); check --host or pick another --port"
        ) from e


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_concurrency: int = 4,
    quantize: str = "none",
) -> None:
    """Load a model and answer HTTP requests until interrupted."""
    import uvicorn

    if max_concurrency < 1:
        raise UserError(f"--max-concurrency must be at least 1, got {max_concurrency}")
    sock = listen(host, port)  # before loading the model, so a taken port fails at once
    engine = Engine.load(model, quantize=quantize, max_batch=max_concurrency)
    app = create_app(engine, api_key=api_key, max_concurrency=max_concurrency, model_id=model)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s at http://%s:%d (chat page at /, API under /v1); Ctrl-C stops", model, shown, port)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn has shut down cleanly and re-raised Ctrl-C: stopping is the normal end
        log.info("stopped")
