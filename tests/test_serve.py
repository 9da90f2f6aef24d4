"""`mm1 serve` on a tiny trained run: the official `openai` client against a running server, the
engine's continuous batching against requests run alone, bad input while a load runs, and the
chat page driven in a real headless Chromium."""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

import mm1
from mm1 import cli
from mm1.chat import resolve_chat_template
from mm1.data.sources import decode_image
from mm1.pretrained import Pretrained, load_pretrained
from mm1.serve import add_arguments as serve_arguments
from mm1.serve.app import create_app, serving_in_thread
from mm1.serve.engine import Engine, Event, QueueFull, Request
from mm1.serve.protocol import MAX_IMAGE_PIXELS, APIError, ServeOptions, load_image_url

MODEL = "tiny"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    world = tmp_path_factory.mktemp("serve") / "world"
    assert cli.main(["data", "synth", "--out", str(world), "--size", "tiny"]) == 0
    return world


@pytest.fixture(scope="module")
def run(world, tiny_train_args) -> Path:
    """The tiny run, trained 3 steps. MM1_SERVE_MODEL=DIR runs these tests on another model,
    e.g. the demo's SFT run, whose margins no float rounding flips."""
    if os.environ.get("MM1_SERVE_MODEL"):
        return Path(os.environ["MM1_SERVE_MODEL"])
    assert cli.main(tiny_train_args(world.parent / "run")) == 0
    return world.parent / "run"


@pytest.fixture(scope="module")
def pretrained(run) -> Pretrained:
    return load_pretrained(run)


@pytest.fixture(scope="module")
def images(world) -> list[Path]:
    return sorted((world / "eval" / "val" / "images").iterdir())[:4]


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def options(p: Pretrained, **kw) -> ServeOptions:
    template = resolve_chat_template(p.tokenizer, None)
    return ServeOptions(model_name=MODEL, chat_template=template.source, **kw)


@contextlib.contextmanager
def serving(p: Pretrained, engine_kw: dict | None = None, **opts) -> Iterator[tuple[str, Engine]]:
    """A server on a free loopback port in this process, for the length of the block."""
    engine = Engine(p.model, p.tokenizer, **{"max_batch": 4, **(engine_kw or {})})
    with serving_in_thread(create_app(p, engine, options(p, **opts))) as url:
        yield url, engine


@pytest.fixture(scope="module")
def server(pretrained) -> Iterator[str]:
    with serving(pretrained) as (url, _):
        yield url


@contextlib.contextmanager
def slow(p: Pretrained, seconds: float = 0.02) -> Iterator[None]:
    """Every decoder forward takes at least `seconds`: answers long enough to act on midway."""
    hook = p.model.decoder.register_forward_pre_hook(lambda *_: time.sleep(seconds))
    try:
        yield
    finally:
        hook.remove()


@pytest.fixture
def reference(greedy_chat_answer):
    """`reference(pretrained, text, image_paths, max_new)`: (answer, prompt tokens, completion
    tokens) by another road, the images first as the page and `user` put them."""

    def answer(p: Pretrained, text: str, image_paths: list[Path], max_new: int):
        content = "\n".join(["<image>"] * len(image_paths) + [text])
        template = resolve_chat_template(p.tokenizer, None).source
        return greedy_chat_answer(p, content, image_paths, template, max_new)

    return answer


def user(text: str, image_paths: list[Path]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in image_paths]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def test_openai_client_plain_and_streaming_with_an_image(
    reference, server, pretrained, images
) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == [MODEL]
    want, prompt_tokens, completion_tokens = reference(pretrained, "Describe it.", images[:1], 16)
    got = client.chat.completions.create(
        model=MODEL, messages=user("Describe it.", images[:1]), max_tokens=16, temperature=0
    )
    assert got.choices[0].message.content == want
    assert got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.prompt_tokens == prompt_tokens
    assert got.usage.completion_tokens == completion_tokens
    assert got.usage.total_tokens == prompt_tokens + completion_tokens

    stream = client.chat.completions.create(
        model=MODEL,
        messages=user("Describe it.", images[:1]),
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == completion_tokens
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_what_openai_clients_send_and_ask_is_answered(reference, server, pretrained) -> None:
    """Null for a nullable field (n, stream), the developer role (OpenAI's newer system), the
    defaults of options not supported, one model's card, and errors in OpenAI's body for routes
    that do not exist (they had FastAPI's {"detail": ...})."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("other")
    assert missing.value.body["code"] == "model_not_found"
    want, _, _ = reference(pretrained, "hi", [], 6)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0}
    as_system = httpx.post(f"{server}/v1/chat/completions", json={**body, "messages": system})
    defaults = {
        "n": None,
        "stream": None,
        "stream_options": None,
        "logprobs": False,
        "frequency_penalty": 0,
        "presence_penalty": 0.0,
        "tool_choice": "none",
        "tools": [],
        "response_format": {"type": "text"},
    }
    for extra, messages in [
        (defaults, [{"role": "user", "content": "hi"}]),
        ({}, [{**system[0], "role": "developer"}, system[1]]),
    ]:
        r = httpx.post(
            f"{server}/v1/chat/completions", json={**body, **extra, "messages": messages}
        )
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["message"]["content"]
        assert got == (want if extra else as_system.json()["choices"][0]["message"]["content"])
    for method, path, status in [
        ("GET", "/v1/nothing", 404),
        ("GET", "/v1/chat/completions", 405),
        ("DELETE", "/v1/models", 405),
    ]:
        r = httpx.request(method, f"{server}{path}")
        assert r.status_code == status
        error = r.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"


def test_the_engine_outlives_failed_forwards(pretrained, images) -> None:
    """A prefill or a decode step that raises (on a GPU: out of memory) fails its requests and
    no others: a failed prefill kept its cache rows (each failure lost rows until no request
    could join and the loop spun), and a failure to make a new cache after a failed step
    ended the engine's thread (every later request waited forever)."""
    requests = engine_requests(pretrained, images)
    engine = Engine(pretrained.model, pretrained.tokenizer, max_batch=2).start()
    want = answers_one_at_a_time(engine, requests[:2])
    failing = {"on": False}

    def fail(*_) -> None:
        if failing["on"]:
            raise RuntimeError("out of memory (simulated)")

    hook = pretrained.model.decoder.register_forward_pre_hook(fail)
    try:
        failing["on"] = True
        for _ in range(3):  # 2 rows: a lost row each time would leave none
            done, events = collect(engine, requests[0])
            assert done.wait(30) and events[-1].kind == "error"
            assert events[-1].text.startswith("prefill failed: out of memory (simulated)")
        failing["on"] = False
        with slow(pretrained, 0.02):
            done, events = collect(engine, dataclasses.replace(requests[0], max_new_tokens=200))
            while not engine.steps or not events:
                time.sleep(0.01)  # decoding
            real = engine._new_batch
            engine._new_batch = lambda: fail()  # and no memory for a new cache either
            failing["on"] = True
            assert done.wait(30) and events[-1].kind == "error"
            assert events[-1].text.startswith("decoding failed: out of memory (simulated)")
            refused, events = collect(engine, requests[1])
            assert refused.wait(30) and events[-1].text.startswith("no KV cache: out of memory")
        failing["on"] = False
        engine._new_batch = real
        assert answers_one_at_a_time(engine, requests[:2]) == want
        assert engine.load == {"running": 0, "waiting": 0} and engine._thread.is_alive()
    finally:
        hook.remove()
        engine.stop()


def test_a_request_that_timed_out_is_not_retried(pretrained, images) -> None:
    """408 is what OpenAI's SDKs retry; a request that ran out of --request-timeout would run
    out of it again: the response says not to (x-should-retry: false)."""
    with serving(pretrained, request_timeout=0.5) as (url, engine), slow(pretrained, 0.05):
        body = {"model": MODEL, "messages": user("Describe it.", images[:1]), "max_tokens": 200}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 408 and r.headers["x-should-retry"] == "false"
        assert r.json()["error"]["code"] == "timeout"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=2)
        steps = engine.steps
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(**body)
        assert err.value.status_code == 408
        assert engine.steps - steps <= 0.5 / 0.05 + 2  # one attempt's steps, not three


def test_stop_strings_and_seeded_sampling(reference, server, pretrained, images) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    want, _, _ = reference(pretrained, "What is it?", images[1:2], 24)
    assert len(want) > 6, want
    stop = want[len(want) // 2 : len(want) // 2 + 3]
    got = client.chat.completions.create(
        model=MODEL,
        messages=user("What is it?", images[1:2]),
        max_tokens=24,
        temperature=0,
        stop=[stop],
    )
    assert got.choices[0].message.content == want[: want.find(stop)]
    assert got.choices[0].finish_reason == "stop"

    def sample(seed: int) -> str:
        r = client.chat.completions.create(
            model=MODEL,
            messages=user("Hello.", []),
            max_tokens=12,
            temperature=1.5,
            top_p=0.9,
            seed=seed,
        )
        return r.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in range(4)}) > 1  # sampling does sample


def test_a_reasoning_block_comes_as_reasoning_content(reference, pretrained, images) -> None:
    """An engine for a template whose generation prompt opens a reasoning block: the tiny model
    never closes it, so all of its greedy answer is reasoning, in `reasoning_content` (vLLM's
    field) whole and streamed, and the content is empty; the chat page shows it apart."""
    want, _, _ = reference(pretrained, "What is it?", images[:1], 12)
    assert want.strip("\n")
    with serving(pretrained, reasoning=True) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        ask = dict(model=MODEL, messages=user("What is it?", images[:1]), max_tokens=12)
        message = client.chat.completions.create(**ask, temperature=0).choices[0].message
        assert message.content == ""
        assert message.model_extra["reasoning_content"] == want.strip("\n")
        chunks = client.chat.completions.create(**ask, temperature=0, stream=True)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == want.strip("\n")
    assert not "".join(d.content or "" for d in deltas)
    # the chat page shows the reasoning apart from the (here empty) answer
    plain, _, _ = reference(pretrained, "What is it?", [], 12)
    assert plain.strip("\n")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    with serving(pretrained, reasoning=True) as (url, _):
        driver = chromium()
        try:
            driver.get(url + "/")
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text == MODEL)
            driver.find_element(By.ID, "max_tokens").clear()
            driver.find_element(By.ID, "max_tokens").send_keys("12")
            driver.find_element(By.ID, "text").send_keys("What is it?")
            driver.find_element(By.ID, "send").click()
            done = ".turn.assistant[data-done='true']"
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, done))
            thought = driver.find_element(By.CSS_SELECTOR, f"{done} .reasoning .thought")
            assert thought.get_attribute("textContent") == plain.strip("\n")
            assert driver.find_element(By.CSS_SELECTOR, f"{done} .content").text == ""
        finally:
            driver.quit()


def test_tiled_images_answer_as_mm1_chat_does(world, tiny_train_args, images) -> None:
    """A model with the `anyres` layout (tiles of each image's own canvas): two requests with
    images of different sizes, batched, answer as `mm1 chat` answers each alone."""
    from PIL import Image

    from mm1.chat import ChatSession, ChatSettings

    run = world.parent / "run_anyres"
    assert cli.main([*tiny_train_args(run), "model.image_layout.type=anyres"]) == 0
    p = load_pretrained(run)
    wide = world.parent / "wide.png"
    Image.open(images[0]).resize((150, 60)).save(wide)
    asks = [("Describe it.", [wide]), ("What is in both?", [images[1], wide])]
    want = []
    for text, pics in asks:
        session = ChatSession(p, resolve_chat_template(p.tokenizer, None), ChatSettings(12))
        loaded = [decode_image(path.read_bytes()) for path in pics]
        want.append(session.reply(text, loaded, lambda _: None).text)
    with serving(p) as (url, _), slow(p, 0.01):
        got: list[str] = ["", ""]

        def ask(i: int) -> None:
            body = {"model": MODEL, "messages": user(*asks[i]), "max_tokens": 12, "temperature": 0}
            got[i] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()[
                "choices"
            ][0]["message"]["content"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert got == want


def collect(engine: Engine, request: Request) -> tuple[threading.Event, list[Event]]:
    done, events = threading.Event(), []

    def on_event(ev: Event) -> None:
        events.append(ev)
        if ev.kind in ("done", "error"):
            done.set()

    engine.submit(request, on_event)
    return done, events


def text_of(events: list[Event]) -> str:
    assert events[-1].kind == "done", events[-1]
    return "".join(e.text for e in events if e.kind == "text")


def engine_requests(p: Pretrained, images: list[Path]) -> list[Request]:
    """Prompts of several lengths, with 0-2 images each."""
    from mm1.serve.protocol import parse_chat_request

    asks = [
        ("Describe it.", images[:1]),
        ("Hello, who are you?", []),
        ("Compare them.", images[1:3]),
        ("What colour is the shape in the picture on the left?", images[3:4]),
        ("Count.", images[2:3]),
        ("Tell me about shapes and colours, please.", []),
    ]
    opts = options(p)
    out = []
    for text, pics in asks:
        body = {"model": MODEL, "messages": user(text, pics), "max_tokens": 20, "temperature": 0}
        out.append(parse_chat_request(body, p, opts, p.model.cfg.decoder.max_seq_len).request)
    return out


def answers_one_at_a_time(engine: Engine, requests: list[Request]) -> list[str]:
    """Each request's answer with nothing running beside it."""
    alone = []
    for r in requests:
        done, events = collect(engine, r)
        assert done.wait(60)
        alone.append(text_of(events))
    return alone


def test_greedy_answers_do_not_depend_on_what_runs_beside_them(pretrained, images) -> None:
    """Requests joining a running batch midway (and waiting for a free row) answer exactly as
    they do alone."""
    requests = engine_requests(pretrained, images)
    engine = Engine(pretrained.model, pretrained.tokenizer, max_batch=4).start()
    try:
        alone = answers_one_at_a_time(engine, requests)
        assert engine.max_running == 1
        assert len(set(alone)) > 1, "every prompt gives the same answer: a mix-up would not show"
        with slow(pretrained):
            first = [collect(engine, r) for r in requests[:3]]
            time.sleep(0.1)  # they are decoding now; the rest join midway, two wait for a row
            rest = [collect(engine, r) for r in requests[3:]]
            for done, _ in first + rest:
                assert done.wait(60)
        assert engine.max_running == 4
        assert [text_of(events) for _, events in first + rest] == alone
    finally:
        engine.stop()


def test_a_compiled_engine_answers_as_the_eager_one(pretrained, images) -> None:
    """`mm1 serve --compile`: every step runs all rows at fixed shapes; seven requests at once
    (four decode, three wait and join as rows free) answer as each does alone on the eager
    engine, and nothing compiles after the warm-up."""
    from torch._dynamo.utils import counters

    from mm1.serve.protocol import parse_chat_request

    requests = engine_requests(pretrained, images)
    text = "Tell me about the shapes and the colours in this world. " * 6  # past 64 tokens
    body = {"model": MODEL, "messages": user(text, []), "max_tokens": 20, "temperature": 0}
    limit = pretrained.model.cfg.decoder.max_seq_len
    requests.append(parse_chat_request(body, pretrained, options(pretrained), limit).request)
    eager = Engine(pretrained.model, pretrained.tokenizer, max_batch=4).start()
    try:
        alone = answers_one_at_a_time(eager, requests)
    finally:
        eager.stop()
    engine = Engine(pretrained.model, pretrained.tokenizer, max_batch=4, compile=True)
    assert engine._batch._compiled is not None
    assert engine.steps == 0 and engine._batch.free_rows == 4  # the warm-up left nothing
    graphs = counters["stats"]["unique_graphs"]
    engine.start()
    try:
        answers = [collect(engine, r) for r in requests]
        for done, _ in answers:
            assert done.wait(120)
        assert engine.max_running == 4
        assert [text_of(events) for _, events in answers] == alone
        # the warm-up compiled everything: a prompt past the first key bucket compiles nothing
        assert len(requests[-1].prompt) > 64
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        engine.stop()


def test_queue_bound_timeout_and_cancel_free_their_rows(pretrained, images) -> None:
    requests = engine_requests(pretrained, images)
    long = Request(requests[0].prompt, requests[0].pixel_values, max_new_tokens=200)
    engine = Engine(pretrained.model, pretrained.tokenizer, max_batch=1, max_waiting=1).start()
    try:
        with slow(pretrained):
            done, _ = collect(engine, long)
            deadline = time.monotonic() + 10
            while not engine._running and time.monotonic() < deadline:
                time.sleep(0.01)
            (answer,) = engine._running.values()
            queued = Request(requests[1].prompt, None, max_new_tokens=5, timeout=0.3)
            timed_done, timed = collect(engine, queued)  # waits behind the long one
            with pytest.raises(QueueFull):
                engine.submit(requests[2], lambda ev: None)
            assert timed_done.wait(5), "a request that timed out in the queue was not told"
            assert [e.code for e in timed] == ["timeout"]
            assert engine.load == {"running": 1, "waiting": 0}
            answer.handle.cancel()  # the long request's client went away
            deadline = time.monotonic() + 5
            while engine.load["running"] and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine.load == {"running": 0, "waiting": 0}
            assert not done.is_set()  # a cancelled request gets no more events
            assert answer.handle.completion_tokens < 200
    finally:
        engine.stop()


def test_no_waiting_room_still_serves_the_free_rows(pretrained, images) -> None:
    """`--max-waiting 0`: a request joins a free row, one beyond the rows is refused (every
    request was refused, the idle server's included)."""
    requests = engine_requests(pretrained, images)
    engine = Engine(pretrained.model, pretrained.tokenizer, max_batch=1, max_waiting=0).start()
    try:
        with slow(pretrained):
            done, events = collect(engine, dataclasses.replace(requests[0], max_new_tokens=40))
            with pytest.raises(QueueFull, match="0 requests are already waiting"):
                engine.submit(requests[1], lambda ev: None)
            assert done.wait(60) and events[-1].kind == "done"
    finally:
        engine.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_slot(reference, pretrained, images, stream) -> None:
    """Streamed or not: a plain request's handler looked for a departed client only while no
    token came, so its answer ran to the end (OpenAI's SDKs retry a timed-out request: each
    retry added another whole answer)."""
    _, _, full = reference(pretrained, "Describe it.", images[:1], 200)
    with serving(pretrained) as (url, engine), slow(pretrained, 0.05):
        body = {
            "model": MODEL,
            "messages": user("Describe it.", images[:1]),
            "max_tokens": 200,
            "stream": stream,
        }
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                while '"content": ""' in next(lines) or not engine.load["running"]:
                    pass  # until the answer's first text: the request is decoding
                assert engine.load["running"] == 1
        else:
            with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1.5 s
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.5)
        deadline = time.monotonic() + 10
        while engine.load["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.load == {"running": 0, "waiting": 0}
        assert 0 < engine.steps < full  # 0.05 s a step: 1.5 s is ~30 of them


BAD = [
    ("{not json", 400, None),
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, None),  # no model
    ({"model": "other", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, None),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "hi " * 2000}]},
        400,
        "context_length_exceeded",
    ),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 9},
        400,
        None,
    ),
    ({"model": MODEL, "messages": []}, 400, None),
    # seeds beyond torch's range: one such request used to stop the engine's thread
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, 400, None),
    (
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": -(2**63) - 1},
        400,
        None,
    ),
    ("[" * 100_000 + "]" * 100_000, 400, None),  # json's RecursionError was a plain-text 500
    (  # the template concatenates eos_token: a TypeError was a plain-text 500
        {
            "model": MODEL,
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "hi"},
            ],
            "chat_template_kwargs": {"eos_token": None},
        },
        400,
        None,
    ),
    # options that change the answer's content or form, refused rather than ignored
    *(
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}, 400, None)
        for extra in (
            {"logprobs": True},
            {"top_logprobs": 3},
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            {"tool_choice": "required"},
            {"response_format": {"type": "json_object"}},
            {"frequency_penalty": -7},
            {"presence_penalty": 0.5},
            {"logit_bias": {"5": 10}},
            {"stream_options": {"include_usage": True}},  # without stream, as OpenAI
        )
    ),
    (  # the body is bounded before it is read whole (this server's max_body_bytes)
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "x": "a" * 400_000},
        413,
        None,
    ),
]


def image_body(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return {"model": MODEL, "messages": [{"role": "user", "content": [part]}]}


def test_bad_input_is_an_openai_error_and_the_load_goes_on(
    reference, pretrained, images, tmp_path
) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    shutil.copy(images[0], allowed / "ok.png")
    outside = tmp_path / "outside.png"
    shutil.copy(images[0], outside)
    not_image = base64.b64encode(b"plain text, not pixels").decode()
    bad = [
        *BAD,
        (image_body(f"data:image/png;base64,{not_image}"), 400, None),
        (image_body(f"data:text/plain;base64,{not_image}"), 400, None),
        (image_body(data_url(images[0]).replace(",", "," + "AAAA" * 40000, 1)), 413, None),
        (image_body(f"file://{outside}"), 403, None),
        (image_body(str(allowed / ".." / "outside.png")), 403, None),
        (image_body("https://example.com/cat.png"), 400, None),
    ]
    with serving(
        pretrained, image_dir=allowed, max_image_bytes=100_000, max_body_bytes=300_000
    ) as (url, _):
        load_body = {
            "model": MODEL,
            "messages": user("Describe it.", images[:1]),
            "max_tokens": 40,
            "temperature": 0,
        }
        want, _, _ = reference(pretrained, "Describe it.", images[:1], 40)
        results: list[str] = []

        def load() -> None:
            r = httpx.post(f"{url}/v1/chat/completions", json=load_body, timeout=120)
            results.append(r.json()["choices"][0]["message"]["content"])

        with slow(pretrained, 0.01):
            workers = [threading.Thread(target=load) for _ in range(3)]
            for w in workers:
                w.start()
            for body, status, code in bad:
                content = body if isinstance(body, str) else json.dumps(body)
                r = httpx.post(f"{url}/v1/chat/completions", content=content, timeout=30)
                assert r.status_code == status, body if isinstance(body, str) else r.text
                error = r.json()["error"]
                assert error["message"] and error["type"]
                assert code is None or error["code"] == code
            allowed_file = {**image_body(f"file://{allowed}/ok.png"), "max_tokens": 8}
            ok = httpx.post(f"{url}/v1/chat/completions", json=allowed_file, timeout=60)
            assert ok.status_code == 200
            for w in workers:
                w.join(120)
        assert results == [want] * 3


def test_mm1_serve_from_the_command_line(run, images) -> None:
    """The real command in its own process: it starts, answers, and stops on SIGINT. (Not
    with --compile: a cold compile of its bf16 decode step cost 30 s of the suite; the compiled
    engine is `test_a_compiled_engine_answers_as_the_eager_one`'s.)"""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(mm1.__file__).parents[1])}
    argv = [sys.executable, "-m", "mm1.cli", "serve", str(run), "--port", str(port)]
    argv += ["--model-name", "m", "--image-dir", str(images[0].parent)]
    argv += ["--dtype", "bf16"]  # read straight into bf16; the image's pixels cast on entry
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "mm1 serve did not come up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            time.sleep(0.2)
        body = image_body(str(images[0]))  # a local file: allowed under --image-dir
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={**body, "model": "m", "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert "serving 'm' (cpu, bfloat16; chat template:" in proc.stderr.read()


def test_serve_cli_checks_its_options(run, capsys) -> None:
    assert cli.main(["serve", str(run), "--max-batch", "0"]) == 2
    out = capsys.readouterr()
    assert "--max-batch must be at least 1" in out.out + out.err
    assert cli.main(["serve", str(run), "--chat-template-kwargs", "[1]"]) == 2
    out = capsys.readouterr()
    assert "--chat-template-kwargs: a JSON object of template variables" in out.out + out.err
    assert cli.main(["serve", str(run), "--max-body-mb", "0"]) == 2
    out = capsys.readouterr()
    assert "--max-body-mb must be > 0, got 0.0" in out.out + out.err


def test_serve_refuses_a_taken_port_before_loading_the_model(tmp_path, capsys) -> None:
    """The port is bound before the model loads (no model at all here): a taken one is a
    one-line error naming --port, and nothing claims to be serving."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", str(tmp_path / "no-model"), "--port", str(port)]) == 2
    out = capsys.readouterr()
    assert out.out + out.err == (
        f"config error: --port {port}: 127.0.0.1:{port} is already in use (another server?): "
        "stop it or pick another --port\n"
    )


def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,800",
    ):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_chat_page_in_a_real_browser(reference, server, pretrained, images, tmp_path) -> None:
    """Upload an image, ask, and read the streamed answer on the page (no skip: a browser that
    cannot start fails the test)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    want, _, _ = reference(pretrained, "Describe it.", images[:1], 128)
    driver = chromium()
    try:
        driver.get(server + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text == MODEL)
        driver.find_element(By.ID, "file").send_keys(str(images[0]))
        WebDriverWait(driver, 10).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, ".pending-image")
        )
        driver.find_element(By.ID, "text").send_keys("Describe it.")
        driver.find_element(By.ID, "send").click()
        answer = WebDriverWait(driver, 60).until(
            lambda d: d.find_element(By.CSS_SELECTOR, ".turn.assistant[data-done='true'] .content")
        )
        assert answer.text.strip() == want.strip()
        assert driver.find_elements(By.CSS_SELECTOR, ".turn.user img")  # the image is shown
        shot = Path(os.environ.get("MM1_SERVE_SCREENSHOT", tmp_path / "chat.png"))
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 0
    finally:
        driver.quit()


def png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_an_image_is_bounded_in_pixels_not_only_bytes(server) -> None:
    """A 291 kB black 10000x10000 PNG (a 300 MB bitmap) and a 164 kB gray 13000x13000 one pass
    --max-image-mb: they are refused from their headers, 400 naming the limit, before decoding.
    A 24 Mpx photo still works (reduced to the cap as the training readers reduce it)."""
    for mode, side in (("RGB", 10000), ("L", 13000)):
        body = image_body(png_url(Image.new(mode, (side, side))))
        r = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "image_too_large" and error["param"] == "messages[0].content[0]"
        assert (
            f"{side}x{side} ({side * side} pixels), over the {MAX_IMAGE_PIXELS}-pixel limit"
            in (error["message"])
        )
        assert "--max-image-pixels" in error["message"]
    photo = {**image_body(png_url(Image.new("RGB", (6000, 4000), (90, 120, 30)))), "max_tokens": 1}
    r = httpx.post(f"{server}/v1/chat/completions", json=photo, timeout=60)
    assert r.status_code == 200, r.text


def test_the_pixel_limit_is_an_option_and_deep_images_are_scaled(pretrained) -> None:
    small = options(pretrained, max_image_pixels=1000)
    url = png_url(Image.new("RGB", (40, 25)))
    assert load_image_url(url, small).size == (40, 25)  # exactly at the limit
    with pytest.raises(APIError, match="over the 1000-pixel limit") as err:
        load_image_url(png_url(Image.new("RGB", (41, 25))), small)
    assert err.value.status == 400 and err.value.code == "image_too_large"
    # A 16-bit PNG decodes as the readers decode it: scaled to 8 bits, not clipped to white.
    deep = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 128 * 257
    assert np.asarray(load_image_url(png_url(deep), options(pretrained))).max() == 128
    parser = argparse.ArgumentParser()
    serve_arguments(parser)
    assert parser.parse_args(["run"]).max_image_pixels == MAX_IMAGE_PIXELS


def test_a_file_url_with_a_host_says_what_to_write(pretrained, tmp_path) -> None:
    """`file://im1.jpg` parses as host "im1.jpg" and no path: it answered "no image file ."."""
    Image.new("RGB", (8, 8)).save(tmp_path / "im1.png")
    opts = options(pretrained, image_dir=tmp_path)
    with pytest.raises(APIError, match=r"file://im1\.png names a host \('im1\.png'\)") as err:
        load_image_url("file://im1.png", opts)
    assert err.value.status == 400 and "file:///ABSOLUTE/PATH" in str(err.value)
    assert load_image_url(f"file://{tmp_path / 'im1.png'}", opts).size == (8, 8)
    assert load_image_url("im1.png", opts).size == (8, 8)


def test_serve_cli_checks_the_pixel_limit(run, capsys) -> None:
    assert cli.main(["serve", str(run), "--max-image-pixels", "-1"]) == 2
    out = capsys.readouterr()
    assert "--max-image-pixels must be >= 0 (0 = no limit), got -1" in out.out + out.err


def test_chat_template_kwargs_per_request_over_the_servers(pretrained) -> None:
    """vLLM's `chat_template_kwargs`: a request's template variables, over the server's
    (`--chat-template-kwargs`), reach its prompt; whether that prompt opens a reasoning block
    (so the answer starts inside it) is judged with them."""
    from mm1.reasoning import chat_reasoning
    from mm1.serve.protocol import parse_chat_request

    source = (
        "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
        "A:{% if think %}<think>\n{% else %}<think></think>{% endif %}{% endif %}"
    )
    tok = pretrained.tokenizer
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}

    def asked(server: dict, request: dict | None) -> tuple[str, bool | None]:
        default = chat_reasoning(source, {**tok.template_variables, **server})
        opts = ServeOptions(MODEL, source, template_kwargs=server, reasoning=default)
        extra = {} if request is None else {"chat_template_kwargs": request}
        r = parse_chat_request({**body, **extra}, pretrained, opts, 256).request
        return tok.decode(r.prompt, skip_special_tokens=True), r.reasoning  # (no BOS)

    assert asked({}, None) == ("Hi\nA:<think></think>", False)
    assert asked({}, {"think": True}) == ("Hi\nA:<think>\n", True)
    assert asked({"think": True}, None) == ("Hi\nA:<think>\n", True)
    assert asked({"think": True}, {"think": False}) == ("Hi\nA:<think></think>", False)
    for wrong in ([1], False, 0, "x"):
        with pytest.raises(APIError, match="chat_template_kwargs must be an object"):
            asked({}, wrong)  # type: ignore[arg-type]
