"""The HTTP side: a Starlette application over a ``Scheduler``.

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream``), ``GET /v1/models``,
``GET /health``, and the web page at ``/`` (``static/index.html`` + ``static/app.js``, shipped in the package;
its style sheet, favicon and example images under ``/static/``).
Every error is OpenAI's JSON error shape (``lavin_edge.serve.errors``). With an API key set, ``/v1/*`` needs
``Authorization: Bearer KEY``; the page and ``/health`` do not. The handlers are module-level functions; the
scheduler and the ``ServerConfig`` they serve live on ``app.state``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from lavin_edge.serve.errors import APIError
from lavin_edge.serve.images import ImageLimits, allow_pixels
from lavin_edge.serve.protocol import Completion, check_json_body, parse_completion
from lavin_edge.serve.scheduler import Event, Job, QueueFull, Scheduler

RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.5


@dataclass
class ServerConfig:
    model_id: str
    limits: ImageLimits = field(default_factory=ImageLimits)
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_body(self) -> int:
        # base64 grows the image by 4/3; the rest of the body is text.
        return self.limits.max_bytes * 4 // 3 + (1 << 20)


def _static(name: str) -> str:
    return files("lavin_edge.serve").joinpath("static", name).read_text(encoding="utf-8")


def _scheduler(request: Request) -> Scheduler:
    return request.app.state.scheduler


def _config(request: Request) -> ServerConfig:
    return request.app.state.config


def check_key(request: Request) -> None:
    """401 unless the request carries the server's API key (none set: every request passes)."""
    key = _config(request).api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.lower().startswith("bearer ") else ""
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        raise APIError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)", None,
                       "invalid_api_key")


async def read_body(request: Request) -> bytes:
    """The request body, 413 past the server's limit (read no further than that)."""
    limit = _config(request).max_body
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes is over the limit of {limit} bytes", None,
                       "request_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise APIError(413, f"request body over the limit of {limit} bytes", None, "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def parse(scheduler: Scheduler, config: ServerConfig, raw: bytes) -> Completion:
    """A body -> a checked ``Completion`` with its image encoded (CPU work: called on a worker thread)."""
    engine = scheduler.engine
    body = check_json_body(raw, config.max_body)
    comp = parse_completion(body, engine.tokenizer, engine.max_context, engine.n_visual,
                            engine.cfg.vision.image_size, config.limits, engine.vision is not None)
    if comp.image is not None:
        # Here, on a worker thread, not on the batching loop's: decode steps of others go on meanwhile.
        comp.visual = engine.encode_image(comp.image)
    return comp


def queue_full(scheduler: Scheduler) -> APIError:
    """503 in the numbers the user set (--slots, --max-queue), not the queue's momentary length."""
    slots, waiting = scheduler.decoder.slots, scheduler.max_queue
    queue = f"{waiting} request{'s' if waiting != 1 else ''} waiting" if waiting else "no request may wait"
    return APIError(503, f"server busy: all {slots} slot{'s' if slots != 1 else ''} taken and {queue} "
                    f"(--max-queue {waiting}); retry later", None, "queue_full", {"Retry-After": str(RETRY_AFTER_S)})


@dataclass
class Reply:
    """What every chunk of one answer repeats."""

    id: str
    created: int
    model: str

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **extra}


def usage(done: dict[str, Any]) -> dict[str, int]:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def chat_completions(request: Request) -> Response:
    check_key(request)
    scheduler, config = _scheduler(request), _config(request)
    comp = await run_in_threadpool(parse, scheduler, config, await read_body(request))  # image decoding: CPU work
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(comp, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    try:
        scheduler.submit(job)
    except QueueFull as e:
        raise queue_full(scheduler) from e
    reply = Reply("chatcmpl-" + uuid.uuid4().hex[:24], int(time.time()), config.model_id)
    if comp.stream:
        return StreamingResponse(sse(scheduler, job, queue, reply), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(request, scheduler, job, queue, reply)


async def collect(request: Request, scheduler: Scheduler, job: Job, queue: asyncio.Queue[Event], reply: Reply
                  ) -> Response:
    """The whole answer as one JSON response; a client that hangs up meanwhile frees its slot."""
    text: list[str] = []
    while True:
        try:
            kind, value = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                scheduler.cancel(job)
                return Response(status_code=499)
            continue
        if kind == "text":
            text.append(value)
        elif kind == "error":
            raise APIError(500, f"generation failed: {value}", None, "internal_error")
        else:
            return JSONResponse({
                "id": reply.id, "object": "chat.completion", "created": reply.created, "model": reply.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None, "finish_reason": value["finish_reason"]}],
                "usage": usage(value)})


def _event(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def sse(scheduler: Scheduler, job: Job, queue: asyncio.Queue[Event], reply: Reply) -> AsyncIterator[str]:
    """The answer as server-sent events in OpenAI's chunk shape, then ``[DONE]``."""

    def delta(d: dict[str, Any], finish: str | None = None) -> str:
        return _event(reply.chunk([{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]))

    try:
        yield delta({"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield delta({"content": value})
            elif kind == "error":
                yield _event(APIError(500, f"generation failed: {value}", None, "internal_error").body())
                break
            else:
                yield delta({}, value["finish_reason"])
                if job.completion.include_usage:
                    yield _event(reply.chunk([], usage=usage(value)))
                break
        yield "data: [DONE]\n\n"
    finally:
        scheduler.cancel(job)  # a client gone mid-stream frees its slot before the next step


async def models(request: Request) -> Response:
    check_key(request)
    config = _config(request)
    return JSONResponse({"object": "list", "data": [
        {"id": config.model_id, "object": "model", "created": config.created, "owned_by": "lavin-edge"}]})


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": _config(request).model_id, **_scheduler(request).load()})


async def index(request: Request) -> Response:
    return HTMLResponse(_static("index.html"))


async def app_js(request: Request) -> Response:
    return Response(_static("app.js"), media_type="text/javascript")


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), exc.status, headers=exc.headers)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    err = APIError(exc.status_code, str(exc.detail), None, None)
    return JSONResponse(err.body(), exc.status_code, headers=dict(exc.headers or {}))


async def server_error(request: Request, exc: Exception) -> Response:
    err = APIError(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")
    return JSONResponse(err.body(), 500)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """The scheduler's threads run while the server does."""
    app.state.scheduler.start()
    try:
        yield
    finally:
        app.state.scheduler.stop()


ROUTES = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
          Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
          Route("/", index, methods=["GET"]), Route("/app.js", app_js, methods=["GET"]),
          Mount("/static", StaticFiles(packages=[("lavin_edge.serve", "static")]))]


def create_app(scheduler: Scheduler, config: ServerConfig) -> Starlette:
    """The application over ``scheduler`` (both on ``app.state``); it starts the scheduler's threads on startup
    and stops them on shutdown."""
    allow_pixels(config.limits)
    app = Starlette(routes=ROUTES, lifespan=lifespan,
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.scheduler = scheduler
    app.state.config = config
    return app
