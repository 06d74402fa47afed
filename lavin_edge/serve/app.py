"""The HTTP side: a Starlette application over a ``Scheduler``.

Routes: ``POST /v1/chat/completions`` (JSON, or server-sent events with ``stream``), ``GET /v1/models``,
``GET /health``, and the web page at ``/`` (``static/index.html`` + ``static/app.js``, shipped in the package;
its style sheet, favicon and example images under ``/static/``).
Every error is OpenAI's JSON error shape (``lavin_edge.serve.errors``). With an API key set, ``/v1/*`` needs
``Authorization: Bearer KEY``; the page and ``/health`` do not.
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
from lavin_edge.serve.images import ImageLimits
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


def create_app(scheduler: Scheduler, config: ServerConfig) -> Starlette:
    """The application; it starts the scheduler's thread on startup and stops it on shutdown."""
    engine = scheduler.engine
    has_vision = engine.vision is not None

    def check_key(request: Request) -> None:
        if config.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not given or not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send the header Authorization: Bearer KEY)", None,
                           "invalid_api_key")

    async def read_body(request: Request) -> bytes:
        limit = config.max_body
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

    def parse(raw: bytes) -> Completion:
        body = check_json_body(raw, config.max_body)
        comp = parse_completion(body, engine.tokenizer, engine.max_context, engine.n_visual,
                                engine.cfg.vision.image_size, config.limits, has_vision)
        if comp.image is not None:
            # Here, on a worker thread, not on the batching loop's: decode steps of others go on meanwhile.
            comp.visual = engine.encode_image(comp.image)
        return comp

    async def chat_completions(request: Request) -> Response:
        check_key(request)
        comp = await run_in_threadpool(parse, await read_body(request))  # image decoding: CPU work
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(comp, lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise APIError(503, f"server busy: {e}; retry later", None, "queue_full",
                           {"Retry-After": str(RETRY_AFTER_S)}) from e
        rid = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        if comp.stream:
            return StreamingResponse(sse(job, queue, rid, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, job, queue, rid, created)

    async def collect(request: Request, job: Job, queue: asyncio.Queue[Event], rid: str, created: int
                      ) -> Response:
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
                    "id": rid, "object": "chat.completion", "created": created, "model": config.model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "logprobs": None, "finish_reason": value["finish_reason"]}],
                    "usage": usage(value)})

    def usage(done: dict[str, Any]) -> dict[str, int]:
        p, c = done["prompt_tokens"], done["completion_tokens"]
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def sse(job: Job, queue: asyncio.Queue[Event], rid: str, created: int) -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": config.model_id,
                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(obj)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield chunk({"content": value})
                elif kind == "error":
                    err = APIError(500, f"generation failed: {value}", None, "internal_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                else:
                    yield chunk({}, value["finish_reason"])
                    if job.completion.include_usage:
                        obj = {"id": rid, "object": "chat.completion.chunk", "created": created,
                               "model": config.model_id, "choices": [], "usage": usage(value)}
                        yield f"data: {json.dumps(obj)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            scheduler.cancel(job)  # a client gone mid-stream frees its slot before the next step

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_id, "object": "model", "created": config.created, "owned_by": "lavin-edge"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": config.model_id, **scheduler.load()})

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
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"]),
              Route("/", index, methods=["GET"]), Route("/app.js", app_js, methods=["GET"]),
              Mount("/static", StaticFiles(packages=[("lavin_edge.serve", "static")]))]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
