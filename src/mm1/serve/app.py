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

from mm1.pretrained import Pretrained
from mm1.serve.engine import Engine, Event, Handle, QueueFull
from mm1.serve.protocol import APIError, ChatRequest, ServeOptions, parse_chat_request

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
        return JSONResponse(err.body(), status_code=err.status)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": opts.model_name, **engine.load}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": opts.model_name, "object": "model", "created": created, "owned_by": "mm1"}
        return {"object": "list", "data": [card]}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("mm1.serve").joinpath("static/chat.html").read_text("utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the body is not valid JSON: {err}") from None
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
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.handle.cancel()
                        return JSONResponse({}, status_code=499)
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
