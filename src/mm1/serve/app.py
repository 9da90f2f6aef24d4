"""`mm1 serve`: OpenAI's chat-completions API and a chat page over one continuous-batching engine.

Routes: `POST /v1/chat/completions` (plain, or streamed as server-sent events in OpenAI's chunk
format), `GET /v1/models`, `GET /health`, and the chat page at `/`. Request handlers only parse,
tokenize and wait; the engine's thread runs the model. A client that disconnects cancels its
request, which frees its cache row at the next decode step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mm1.pretrained import Pretrained
from mm1.serve.engine import Engine, Event, Handle, QueueFull
from mm1.serve.protocol import (
    APIError,
    ChatRequest,
    ServeOptions,
    model_not_found,
    parse_chat_request,
)

# Waiting on a non-streamed answer, a handler looks for a departed client this often (seconds).
DISCONNECT_POLL = 0.25


def create_app(pretrained: Pretrained, engine: Engine, opts: ServeOptions) -> FastAPI:
    """The ASGI app; the engine is started with the app and stopped with it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="mm1", lifespan=lifespan, docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        # an unknown route or method, in OpenAI's error body rather than FastAPI's
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        return _error_response(APIError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        # a bug: the client still gets OpenAI's error body (the traceback goes to the log)
        message = f"internal error: {type(err).__name__}: {err}"
        return _error_response(APIError(500, message, type="server_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": opts.model_name, **engine.load}

    card = {"id": opts.model_name, "object": "model", "created": created, "owned_by": "mm1"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        if model != opts.model_name:
            raise model_not_found(model, opts.model_name)
        return card

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("mm1.serve").joinpath("static/chat.html").read_text("utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = json.loads(await _body(request, opts.max_body_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the body is not valid JSON: {err}") from None
        except RecursionError:
            raise APIError(400, "the body's JSON is nested too deeply") from None
        parsed = await run_in_threadpool(parse_chat_request, body, pretrained, opts, engine.context)
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            handle = engine.submit(
                parsed.request, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
            )
        except QueueFull as err:
            raise APIError(
                429,
                f"the server is busy ({err}); retry later",
                type="requests",
                code="rate_limit_exceeded",
            ) from None
        completion = _Completion(opts.model_name, handle)
        if parsed.stream:
            return StreamingResponse(
                completion.chunks(events, parsed), media_type="text/event-stream"
            )
        return await completion.whole(events, request)

    return app


class _Completion:
    """One request's answer, written as OpenAI writes it."""

    def __init__(self, model: str, handle: Handle) -> None:
        self.model, self.handle = model, handle
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def usage(self) -> dict[str, int]:
        p, c = self.handle.prompt_tokens, self.handle.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def whole(self, events: asyncio.Queue[Event], request: Request) -> JSONResponse:
        text: list[str] = []
        reasoning: list[str] = []
        check_at = time.monotonic() + DISCONNECT_POLL
        try:
            while True:
                try:
                    ev: Event | None = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    ev = None
                # looked for while tokens flow too, or a departed client's answer runs to its end
                if ev is None or time.monotonic() >= check_at:
                    if await request.is_disconnected():
                        self.handle.cancel()
                        return JSONResponse({}, status_code=499)
                    check_at = time.monotonic() + DISCONNECT_POLL
                if ev is None:
                    continue
                if ev.kind == "text":
                    text.append(ev.text)
                elif ev.kind == "reasoning":
                    reasoning.append(ev.text)
                elif ev.kind == "error":
                    raise _event_error(ev)
                else:
                    break
        finally:
            self.handle.cancel()  # no-op once done; frees the slot if the handler was cancelled
        message = {"role": "assistant", "content": "".join(text)}
        if reasoning:  # vLLM's field for a reasoning block
            message["reasoning_content"] = "".join(reasoning)
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": ev.finish_reason,
            "logprobs": None,
        }
        return JSONResponse(
            {
                "id": self.id,
                "object": "chat.completion",
                "created": self.created,
                "model": self.model,
                "choices": [choice],
                "usage": self.usage(),
            }
        )

    def _chunk(self, delta: dict[str, str], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return self._event({"choices": [choice]})

    def _event(self, fields: dict[str, Any]) -> str:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            **fields,
        }
        return f"data: {json.dumps(chunk)}\n\n"

    async def chunks(self, events: asyncio.Queue[Event], parsed: ChatRequest) -> AsyncIterator[str]:
        """Server-sent events: the role, the text as it comes, the finish reason, usage if asked,
        and `[DONE]`. A client that goes away cancels the request (the generator is closed)."""
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            while True:
                ev = await events.get()
                if ev.kind == "text":
                    yield self._chunk({"content": ev.text})
                elif ev.kind == "reasoning":
                    yield self._chunk({"reasoning_content": ev.text})
                elif ev.kind == "error":
                    yield f"data: {json.dumps(_event_error(ev).body())}\n\n"
                    break
                else:
                    yield self._chunk({}, ev.finish_reason)
                    if parsed.include_usage:
                        yield self._event({"choices": [], "usage": self.usage()})
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.handle.cancel()


def _event_error(ev: Event) -> APIError:
    if ev.code == "timeout":
        return APIError(408, ev.text, type="timeout", code="timeout")
    return APIError(500, ev.text, type="server_error", code=ev.code)


def _error_response(err: APIError) -> JSONResponse:
    # OpenAI's SDKs retry a 408 (and 409, 429, 5xx) unless told not to: a request that ran out
    # of the server's --request-timeout would only run out of it again.
    headers = {"x-should-retry": "false"} if err.code == "timeout" else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def _body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) past `limit` bytes before more of it is read."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _body_too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the {limit} byte limit (--max-body-mb)")


@contextmanager
def serving_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a thread of this process for the length of the block; yields its base
    URL (port 0: a free port). For tests and benchmarks; `mm1 serve` runs uvicorn itself."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="mm1-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
