"""`culturalign serve`: the OpenAI-compatible server, on loopback, with the tiny model and a tiny registry.

Clients are the official `openai` package and, for inputs it would refuse to send (malformed JSON,
oversized bodies, bad headers), a raw `http.client` connection. Every test has bounded timeouts.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import torch
from conftest import BagOfWords, make_registry

from culturalign.backends import GenerationRequest
from culturalign.committee.compose import CommitteeConfig, load_committee
from culturalign.committee.router import RouterConfig
from culturalign.errors import CulturalignError
from culturalign.serve import ServeConfig, create_app
from culturalign.serve.batcher import render_chat
from culturalign.serve.server import bind, check_host, uvicorn_server

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT = 60  # seconds any one request may take in these tests
EXPERTS = ["culturalign/CN", "culturalign/JP", "culturalign/US"]


# ---- a server on loopback, in a thread ----------------------------------------------------------------

class Running:
    def __init__(self, app, sock):
        self.app, self.sock = app, sock
        self.host, self.port = sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"

    @property
    def server(self):
        return self.app.state.server

    def client(self, api_key: str = "not-needed", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=TIMEOUT, **kw)

    def raw(self, method: str, path: str, body: bytes | str | dict | list | None = None, headers: dict | None = None,
            chunked: bool = False) -> tuple[int, dict, dict]:
        """(status, headers, JSON body) of one request sent as given (no client-side checks)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            if isinstance(body, str):
                body = body.encode()
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            if chunked:
                conn.putrequest(method, path)
                for k, v in {**hdrs, "Transfer-Encoding": "chunked"}.items():
                    conn.putheader(k, v)
                conn.endheaders()
                for i in range(0, len(body), 65536):
                    part = body[i : i + 65536]
                    conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                conn.send(b"0\r\n\r\n")
            else:
                conn.request(method, path, body=body, headers=hdrs)
            r = conn.getresponse()
            data = r.read()
            return r.status, dict(r.getheaders()), json.loads(data) if data else {}
        finally:
            conn.close()


@contextlib.contextmanager
def serving(app):
    """Serve `app` on 127.0.0.1 (a free port) in a background thread; stop it on exit."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield Running(app, sock)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(scope="module")
def registry_dir(tiny_lm, tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("serve-reg") / "experts", tiny_lm)


@pytest.fixture(scope="module")
def committee(tiny_lm, registry_dir):
    """Routing without the gate (the hash encoder is no judge of culture-dependence)."""
    return load_committee(tiny_lm, str(registry_dir), RouterConfig(gate=False),
                          CommitteeConfig(max_new_tokens=6, compose_max_new_tokens=6), encoder=BagOfWords())


LIMITS = dict(max_tokens_limit=32, max_messages=8, max_body_bytes=65536, max_context=256)


@pytest.fixture(scope="module")
def live(tiny_lm, committee):
    with serving(create_app(tiny_lm, committee, ServeConfig(**LIMITS))) as running:
        yield running


@pytest.fixture(scope="module")
def client(live):
    return live.client()


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def alone(lm, messages, soft=None, max_tokens=5):
    """The greedy continuation of `messages` asked directly of the backend, one row."""
    (g,) = lm.generate([GenerationRequest(render_chat(lm.tokenizer, messages), soft)], max_new_tokens=max_tokens)[0]
    return g


# ---- the standard API through the official client ------------------------------------------------------

def test_models_lists_base_experts_and_committee(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["tiny", *EXPERTS, "culturalign/committee"]
    jp = client.models.retrieve("culturalign/JP")
    assert jp.id == "culturalign/JP" and jp.model_extra["culturalign"]["kind"] == "expert"
    assert jp.model_extra["culturalign"]["soft_prompt_tokens"] == 3
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("culturalign/XX")


def test_chat_completion_of_the_base_model(client, tiny_lm):
    messages = [{"role": "system", "content": "Answer briefly."}, *user("How should I greet an elder?")]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
    g = alone(tiny_lm, messages)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content == g.text
    assert choice.finish_reason == ("stop" if g.finished else "length")
    assert r.usage.prompt_tokens == g.prompt_tokens and r.usage.completion_tokens == g.new_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["culturalign"]["model_kind"] == "base"


def test_an_expert_answers_with_its_soft_prompt(client, tiny_lm, committee):
    messages = user("What do you eat at new year?")
    texts = {}
    for model in EXPERTS:
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=5)
        code = model.split("/")[1]
        g = alone(tiny_lm, messages, committee.registry[code].embeddings)
        assert r.choices[0].message.content == g.text
        assert r.usage.prompt_tokens == g.prompt_tokens == len(render_chat(tiny_lm.tokenizer, messages)) + 3
        extra = r.model_extra["culturalign"]
        assert extra["expert"] == code and extra["soft_prompt_tokens"] == 3
        texts[code] = g.token_ids
    base = alone(tiny_lm, messages).token_ids
    assert len({tuple(t) for t in texts.values()} | {tuple(base)}) > 1  # the soft prompts change the answer


def test_without_max_tokens_the_default_fits_the_context(client, tiny_lm):
    messages = user("word " * 78)
    n = len(render_chat(tiny_lm.tokenizer, messages))
    assert 256 - 32 < n < 256  # less room than the default max_tokens (32 here) leaves
    r = client.chat.completions.create(model="tiny", messages=messages)
    assert r.usage.prompt_tokens == n and r.usage.completion_tokens <= 256 - n
    with pytest.raises(openai.BadRequestError) as e:  # asked for explicitly, it is an error
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=32)
    assert e.value.body["code"] == "context_length_exceeded"


def test_streamed_completion_matches_the_plain_one(client):
    messages = user("Tell me about tea.")
    plain = client.chat.completions.create(model="culturalign/CN", messages=messages, max_tokens=6)
    stream = client.chat.completions.create(model="culturalign/CN", messages=messages, max_tokens=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert finals[0].model_extra["culturalign"]["expert"] == "CN"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # without stream_options there is no usage chunk
    again = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=3, stream=True))
    assert all(c.choices for c in again)


def test_the_raw_stream_is_openai_sse(live):
    conn = http.client.HTTPConnection(live.host, live.port, timeout=TIMEOUT)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "tiny", "messages": user("Hi"), "max_tokens": 3,
                                                                  "stream": True}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    body = r.read().decode()
    conn.close()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


class Gated:
    """The tiny backend, counting generate calls and decode steps; at step `hold` of call `call` it holds the
    generation (after the step's tokens went out) until `go` is set, as a slow model would be mid-answer."""

    def __init__(self, lm, call: int | None = None, hold: int | None = None):
        self.lm, self.call, self.hold = lm, call, hold
        self.calls = self.steps = 0
        self.go = threading.Event()

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def generate(self, requests, **kw):
        outer = kw.pop("on_step", None)
        self.calls, self.steps = self.calls + 1, 0

        def on_step(tokens):
            self.steps += 1
            if outer is not None:
                outer(tokens)
            if (self.calls, self.steps) == (self.call, self.hold):
                self.go.wait(5)  # long enough to see the chunk come; whole-answer streaming only sends it after

        return self.lm.generate(requests, on_step=on_step, **kw)


def first_text_step(tok, ids: list[int]) -> int:
    """The decode step whose token first adds visible text."""
    return next(k for k in range(1, len(ids) + 1) if tok.decode(ids[:k], skip_special_tokens=True).rstrip("\ufffd"))


def streamed(client, **kw) -> tuple[list, list]:
    """(chunks, (generate call, decode step) at which each content chunk arrived) of a streamed completion."""
    gated, chunks, seen = kw.pop("gated"), [], []
    for c in client.chat.completions.create(stream=True, **kw):
        chunks.append(c)
        if c.choices and c.choices[0].delta.content:
            seen.append((gated.calls, gated.steps, c.choices[0].delta.content))
            gated.go.set()
    return chunks, seen


def test_tokens_stream_as_they_are_decoded(tiny_lm):
    """The first content chunk reaches the client while the model is held after the step that decoded it: it is
    sent after one decode step, not after the answer."""
    messages = user("Tell me about tea.")
    g = alone(tiny_lm, messages, max_tokens=8)
    k = first_text_step(tiny_lm.tokenizer, g.token_ids)
    assert g.new_tokens > k + 1  # steps left to stream after the first chunk
    gated = Gated(tiny_lm, call=1, hold=k)
    with serving(create_app(gated, None, ServeConfig(**LIMITS))) as s:
        chunks, seen = streamed(s.client(), gated=gated, model="tiny", messages=messages, max_tokens=8,
                                stream_options={"include_usage": True})
    assert seen[0][:2] == (1, k)  # received while generation was held at step k of 8
    assert len(seen) > 1 and [x[1] for x in seen] == sorted(x[1] for x in seen) and gated.steps == g.new_tokens
    assert "".join(x[2] for x in seen) == g.text
    assert chunks[-1].usage.completion_tokens == g.new_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ("stop" if g.finished else "length")


def test_streaming_rows_share_one_batch_and_stop_at_their_own_max_tokens(tiny_lm, committee):
    models = ["culturalign/CN", "tiny", "culturalign/US"]
    questions = ["How do you greet elders?", "What is a good gift?", "Who pays for dinner?"]
    with serving(create_app(tiny_lm, committee, ServeConfig(batch_window_ms=1000, max_batch=8))) as s:
        c = s.client()
        results: dict[int, list] = {}

        def ask(i):
            results[i] = list(c.chat.completions.create(model=models[i], messages=user(questions[i]), max_tokens=3 + 2 * i,
                                                        stream=True, stream_options={"include_usage": True}))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        stats = s.raw("GET", "/health")[2]["stats"]
    assert sorted(results) == [0, 1, 2] and stats["batches"] == 1 and stats["rows"] == 3
    for i, chunks in results.items():
        soft = committee.registry[models[i].split("/")[-1]].embeddings if models[i] != "tiny" else None
        g = alone(tiny_lm, user(questions[i]), soft, max_tokens=3 + 2 * i)
        assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == g.text
        assert chunks[-1].usage.completion_tokens == g.new_tokens
        assert [x for x in chunks if x.choices][-1].model_extra["culturalign"]["batch_size"] == 3


def test_the_committee_streams_its_composed_reply_once_the_experts_answered(tiny_lm, registry_dir, committee):
    q = "What do people in China and Japan eat at new year?"
    expected = committee.ask(q)
    assert expected.answer["composed"] is True and len(expected.experts) >= 2
    probe, marks = Gated(tiny_lm), []
    c = load_committee(probe, str(registry_dir), RouterConfig(gate=False), committee.config, encoder=BagOfWords())
    assert c.ask(q, on_text=lambda d: marks.append((probe.calls, probe.steps, d))).to_json()["answer"] == expected.answer
    call, step, _ = marks[0]
    assert call == 2 and "".join(m[2] for m in marks) == expected.answer["text"]  # the composition, the 2nd call
    gated = Gated(tiny_lm, call=2, hold=step)
    c = load_committee(gated, str(registry_dir), RouterConfig(gate=False), committee.config, encoder=BagOfWords())
    with serving(create_app(gated, c, ServeConfig(**LIMITS))) as s:
        chunks, seen = streamed(s.client(), gated=gated, model="culturalign/committee", messages=user(q))
    assert seen[0][:2] == (2, step) and len(seen) > 1
    assert "".join(x[2] for x in seen) == expected.answer["text"]
    final = [x for x in chunks if x.choices][-1]
    assert final.model_extra["culturalign"]["answer"] == expected.answer


def test_whole_answer_streaming_is_kept_as_an_option(tiny_lm):
    """`stream_mode="answer"`: the answer is generated first, then sent (what `benchmarks/serve.py` compares with)."""
    messages = user("Tell me about tea.")
    g = alone(tiny_lm, messages, max_tokens=8)
    gated = Gated(tiny_lm, call=1, hold=first_text_step(tiny_lm.tokenizer, g.token_ids))
    gated.go.set()  # nothing to wait for: no chunk comes before the end
    with serving(create_app(gated, None, ServeConfig(**LIMITS, stream_mode="answer"))) as s:
        _, seen = streamed(s.client(), gated=gated, model="tiny", messages=messages, max_tokens=8)
    assert all(x[1] == g.new_tokens for x in seen) and "".join(x[2] for x in seen) == g.text


def test_an_error_before_the_first_token_is_an_http_error_when_streaming(tiny_lm):
    with serving(create_app(Broken(tiny_lm))) as s:
        with pytest.raises(openai.InternalServerError):
            list(s.client().chat.completions.create(model="tiny", messages=user("Hi"), max_tokens=3, stream=True))
        with pytest.raises(openai.BadRequestError) as e:
            list(s.client().chat.completions.create(model="tiny", messages=user("word " * 3000), max_tokens=3, stream=True))
        assert e.value.body["code"] == "context_length_exceeded"


def test_an_error_after_the_first_token_ends_the_stream_with_an_error_event(tiny_lm):
    class FailsMidway(Gated):
        def generate(self, requests, **kw):
            outer = kw.pop("on_step")

            def on_step(tokens):
                outer(tokens)
                self.steps += 1
                if self.steps == 3:
                    raise RuntimeError("device lost (simulated)")

            return self.lm.generate(requests, on_step=on_step, **kw)

    messages = user("Tell me about tea.")
    g = alone(tiny_lm, messages, max_tokens=8)
    assert first_text_step(tiny_lm.tokenizer, g.token_ids) < 3 < g.new_tokens
    with serving(create_app(FailsMidway(tiny_lm))) as s:
        got = []
        with pytest.raises(openai.APIError) as e:
            for c in s.client().chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True):
                got.append(c)
        assert any(c.choices and c.choices[0].delta.content for c in got)
        assert "device lost" not in str(e.value) and s.raw("GET", "/health")[0] == 200


def test_the_committee_routes_and_reports_its_experts(client, committee):
    q = "What do people in China and Japan eat at new year?"
    r = client.chat.completions.create(model="culturalign/committee", messages=user(q))
    expected = committee.ask(q).to_json()
    extra = r.model_extra["culturalign"]
    assert r.choices[0].message.content == expected["answer"]["text"]
    for key in ("routing", "experts", "answer", "tokens", "culture", "system"):
        assert extra[key] == expected[key], key
    assert len(extra["experts"]) >= 2 and extra["answer"]["composed"] is True
    assert r.usage.completion_tokens == expected["tokens"]["generated"]
    # the user's culture: a body field (extra_body) or a header, routed to that culture's expert
    by_body = client.chat.completions.create(model="culturalign/committee", messages=user(q), extra_body={"culture": "Japan"})
    by_header = client.chat.completions.create(model="culturalign/committee", messages=user(q),
                                               extra_headers={"X-Culturalign-Culture": "jp"})
    for resp in (by_body, by_header):
        e = resp.model_extra["culturalign"]
        assert e["culture"] == "JP" and [x["code"] for x in e["experts"]] == ["JP"]
        assert resp.choices[0].message.content == committee.ask(q, culture="JP").answer["text"]


def test_the_committee_answers_options_as_ask_does(client, committee):
    q = "Elders should be obeyed."
    opts = ["agree", "undecided", "disagree"]
    r = client.chat.completions.create(model="culturalign/committee", messages=user(q),
                                       extra_body={"culture": "CN", "options": opts})
    a = committee.ask(q, culture="CN", options=opts)
    extra = r.model_extra["culturalign"]
    assert extra["answer"] == a.answer and extra["options"] == opts
    assert r.choices[0].message.content == a.answer["option"] and r.choices[0].finish_reason == "stop"


def test_committee_seed_and_max_tokens_reach_ask(client, committee):
    q = "What do people eat at new year?"
    r = client.chat.completions.create(model="culturalign/committee", messages=user(q), max_tokens=3, seed=7,
                                       temperature=1.0, extra_body={"culture": "US"})
    from dataclasses import replace

    import copy

    c = copy.copy(committee)
    c.config = replace(committee.config, max_new_tokens=3, compose_max_new_tokens=64, seed=7, temperature=1.0)
    a = c.ask(q, culture="US")
    assert r.model_extra["culturalign"]["answer"] == a.answer and a.answer["tokens"] <= 3


def test_a_wrong_key_is_401(tiny_lm, committee):
    with serving(create_app(tiny_lm, committee, ServeConfig(api_key="s3cret"))) as s:
        assert [m.id for m in s.client("s3cret").models.list()][0] == "tiny"
        r = s.client("s3cret").chat.completions.create(model="tiny", messages=user("Hi"), max_tokens=2)
        assert r.choices[0].message.content is not None
        for key in ("wrong", "s3cre", "s3cret2", "S3CRET"):
            with pytest.raises(openai.AuthenticationError) as e:
                s.client(key).chat.completions.create(model="tiny", messages=user("Hi"), max_tokens=2)
            assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        status, headers, body = s.raw("GET", "/v1/models")
        assert status == 401 and body["error"]["type"] == "invalid_request_error" and headers.get("www-authenticate") == "Bearer"
        assert s.raw("GET", "/v1/models", headers={"Authorization": "Basic czNjcmV0"})[0] == 401
        assert s.raw("GET", "/health")[0] == 200  # liveness needs no key


# ---- batching ---------------------------------------------------------------------------------------------

def test_requests_that_arrive_together_share_one_forward_pass(tiny_lm, committee):
    """Four requests for three experts and the base model, one generate call; each answer as if alone."""
    cfg = ServeConfig(batch_window_ms=1000, max_batch=8)  # a generous window: the test machine may be busy
    models = ["culturalign/CN", "culturalign/JP", "tiny", "culturalign/US"]
    questions = ["How do you greet elders?", "What is a good gift?", "Who pays for dinner?", "When do people marry?"]
    with serving(create_app(tiny_lm, committee, cfg)) as s:
        c = s.client()
        results: dict[int, object] = {}

        def ask(i):
            results[i] = c.chat.completions.create(model=models[i], messages=user(questions[i]), max_tokens=3 + i)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        stats = s.raw("GET", "/health")[2]["stats"]
    assert sorted(results) == [0, 1, 2, 3]
    assert stats["batches"] == 1 and stats["rows"] == 4 and stats["largest_batch"] == 4
    for i, r in results.items():
        assert r.model_extra["culturalign"]["batch_size"] == 4
        code = models[i].split("/")[-1]
        soft = committee.registry[code].embeddings if models[i] != "tiny" else None
        g = alone(tiny_lm, user(questions[i]), soft, max_tokens=3 + i)
        assert r.choices[0].message.content == g.text and r.usage.completion_tokens == g.new_tokens  # cut to its own max_tokens


def test_max_batch_one_serves_one_at_a_time(tiny_lm, committee):
    with serving(create_app(tiny_lm, committee, ServeConfig(batch_window_ms=200, max_batch=1))) as s:
        c = s.client()
        threads = [threading.Thread(target=c.chat.completions.create,
                                    kwargs={"model": m, "messages": user("Hi"), "max_tokens": 2}) for m in EXPERTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        stats = s.raw("GET", "/health")[2]["stats"]
    assert stats["batches"] == 3 and stats["largest_batch"] == 1


def test_sampling_with_a_seed_is_reproducible(client):
    kw = dict(model="culturalign/JP", messages=user("Describe a festival."), max_tokens=6, temperature=1.0, seed=11)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


# ---- the queue: never blocks the event loop, bounded, timed out ----------------------------------------------

@contextlib.contextmanager
def worker_held(running):
    """Occupy the model worker with a job that waits for an event (as a long generation would)."""
    release = threading.Event()
    running.server.batcher.submit_call(lambda: release.wait(TIMEOUT))
    deadline = time.monotonic() + 10
    while running.server.batcher.waiting:  # the worker took it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        yield
    finally:
        release.set()


def wait_until_waiting(running, n):
    deadline = time.monotonic() + 10
    while running.server.batcher.waiting != n:
        assert time.monotonic() < deadline, running.server.batcher.waiting
        time.sleep(0.01)


def test_a_busy_model_does_not_block_the_event_loop(live, client):
    with worker_held(live):
        t0 = time.perf_counter()
        assert live.raw("GET", "/health")[0] == 200
        assert [m.id for m in client.models.list()][0] == "tiny"
        assert live.raw("POST", "/v1/chat/completions", {"model": "nope", "messages": user("x")})[0] == 404
        assert time.perf_counter() - t0 < 5


def test_a_full_queue_is_503(tiny_lm, committee):
    with serving(create_app(tiny_lm, committee, ServeConfig(max_queue=1))) as s:
        body = {"model": "tiny", "messages": user("Hi"), "max_tokens": 2}
        with worker_held(s):
            first: dict = {}
            t = threading.Thread(target=lambda: first.update(r=s.raw("POST", "/v1/chat/completions", body)))
            t.start()
            wait_until_waiting(s, 1)
            status, headers, err = s.raw("POST", "/v1/chat/completions", body)
            assert status == 503 and err["error"]["code"] == "queue_full" and headers.get("retry-after") == "1"
            with pytest.raises(openai.InternalServerError) as e:
                s.client().chat.completions.create(**body)
            assert e.value.status_code == 503
        t.join(TIMEOUT)
        assert first["r"][0] == 200  # the queued request is served once the worker is free
        assert s.raw("GET", "/health")[2]["stats"]["rejected"] == 2


def test_a_request_past_its_timeout_is_504_and_never_runs(tiny_lm, committee):
    with serving(create_app(tiny_lm, committee, ServeConfig(timeout=0.5))) as s:
        with worker_held(s):
            t0 = time.perf_counter()
            status, _, err = s.raw("POST", "/v1/chat/completions", {"model": "tiny", "messages": user("Hi"), "max_tokens": 2})
            assert status == 504 and err["error"]["code"] == "timeout"
            assert 0.4 < time.perf_counter() - t0 < 5
            assert s.server.batcher.waiting == 0  # it left the queue at once
        stats = s.raw("GET", "/health")[2]["stats"]
        assert stats["dropped"] == 1 and stats["rows"] == 0


# ---- every bad input gets its 4xx, in OpenAI's error shape ---------------------------------------------------

CHAT = "/v1/chat/completions"
SURVEY = "/v1/culturalign/survey"
OK = {"model": "tiny", "messages": user("Hi"), "max_tokens": 2}


def chat(**changes):
    body = {**OK, **changes}
    return {k: v for k, v in body.items() if v is not ...}


BAD = [
    # (id, method, path, body, headers, status, param or None, needle)
    ("malformed-json", "POST", CHAT, "{nope", None, 400, None, "parse the JSON"),
    ("truncated-json", "POST", CHAT, '{"model": "tiny", "messages": [', None, 400, None, "parse the JSON"),
    ("nan-in-json", "POST", CHAT, '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     None, 400, None, "NaN"),
    ("not-utf8", "POST", CHAT, b'{"model": "\xff\xfe"}', None, 400, None, "parse the JSON"),
    ("deeply-nested", "POST", CHAT, "[" * 30000 + "]" * 30000, None, 400, None, "JSON"),
    ("empty-body", "POST", CHAT, "", None, 400, None, "empty"),
    ("body-is-a-list", "POST", CHAT, [OK], None, 400, None, "JSON object"),
    ("unknown-model", "POST", CHAT, chat(model="gpt-4o"), None, 404, "model", "gpt-4o"),
    ("unknown-expert", "POST", CHAT, chat(model="culturalign/XX"), None, 404, "model", "culturalign/XX"),
    ("model-not-a-string", "POST", CHAT, chat(model=5), None, 400, "model", "string"),
    ("missing-model", "POST", CHAT, chat(model=...), None, 400, "model", "missing"),
    ("missing-messages", "POST", CHAT, chat(messages=...), None, 400, "messages", "missing"),
    ("no-messages", "POST", CHAT, chat(messages=[]), None, 400, "messages", "at least 1"),
    ("too-many-messages", "POST", CHAT, chat(messages=user("a") * 9), None, 400, "messages", "limit is 8"),
    ("unknown-role", "POST", CHAT, chat(messages=[{"role": "tool", "content": "x"}]), None, 400, "messages[0].role", "tool"),
    ("message-without-content", "POST", CHAT, chat(messages=[{"role": "user"}]), None, 400, "messages[0].content", "missing"),
    ("image-content", "POST", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     None, 400, "messages[0].content", "only text"),
    ("tool-calls", "POST", CHAT, chat(messages=[{"role": "assistant", "content": "x", "tool_calls": []}]), None, 400,
     "messages[0].tool_calls", "unrecognized"),
    ("temperature-as-text", "POST", CHAT, chat(temperature="0.5"), None, 400, "temperature", "number"),
    ("temperature-too-high", "POST", CHAT, chat(temperature=2.5), None, 400, "temperature", "less than or equal to 2"),
    ("temperature-negative", "POST", CHAT, chat(temperature=-0.1), None, 400, "temperature", "greater than or equal to 0"),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), None, 400, "max_tokens", "greater than or equal to 1"),
    ("max-tokens-over-limit", "POST", CHAT, chat(max_tokens=33), None, 400, "max_tokens", "at most 32"),
    ("max-completion-tokens-over-limit", "POST", CHAT, chat(max_tokens=..., max_completion_tokens=1000), None, 400,
     "max_completion_tokens", "at most 32"),
    ("max-tokens-float", "POST", CHAT, chat(max_tokens=2.5), None, 400, "max_tokens", "integer"),
    ("max-tokens-disagree", "POST", CHAT, chat(max_tokens=2, max_completion_tokens=3), None, 400, None, "differ"),
    ("n-two", "POST", CHAT, chat(n=2), None, 400, "n", "must be 1"),
    ("top-p", "POST", CHAT, chat(top_p=0.5), None, 400, "top_p", "not supported"),
    ("stop", "POST", CHAT, chat(stop=["\n"]), None, 400, "stop", "not supported"),
    ("logprobs", "POST", CHAT, chat(logprobs=True), None, 400, "logprobs", "not supported"),
    ("seed-negative", "POST", CHAT, chat(seed=-1), None, 400, "seed", "greater than or equal to 0"),
    ("seed-huge", "POST", CHAT, chat(seed=2**64), None, 400, "seed", "less than or equal"),
    ("stream-as-text", "POST", CHAT, chat(stream="yes"), None, 400, "stream", "boolean"),
    ("stream-options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}), None, 400, None, "stream"),
    ("unknown-field", "POST", CHAT, chat(temprature=0.5), None, 400, "temprature", "unrecognized"),
    ("context-too-long", "POST", CHAT, chat(messages=user("word " * 400)), None, 400, "messages", "maximum context length"),
    ("culture-unknown", "POST", CHAT, chat(model="culturalign/committee", culture="Atlantis"), None, 400, "culture", "Atlantis"),
    ("culture-empty", "POST", CHAT, chat(culture=""), None, 400, "culture", "at least 1"),
    ("culture-header-empty", "POST", CHAT, chat(), {"X-Culturalign-Culture": " "}, 400, "culture", "empty"),
    ("culture-header-and-body-disagree", "POST", CHAT, chat(model="culturalign/committee", culture="JP"),
     {"X-Culturalign-Culture": "CN"}, 400, "culture", "disagree"),
    ("options-for-an-expert", "POST", CHAT, chat(model="culturalign/JP", options=["a", "b"]), None, 400, "options", "committee"),
    ("options-one", "POST", CHAT, chat(model="culturalign/committee", options=["a"]), None, 400, "options", "at least 2"),
    ("options-twice", "POST", CHAT, chat(model="culturalign/committee", options=["a", "A"]), None, 400, "options", "twice"),
    ("committee-last-message-not-user", "POST", CHAT,
     chat(model="culturalign/committee", messages=[*user("q"), {"role": "assistant", "content": "a"}]), None, 400,
     "messages", "last message"),
    ("committee-empty-question", "POST", CHAT, chat(model="culturalign/committee", messages=user("  ")), None, 400, None, "empty"),
    ("committee-question-too-long", "POST", CHAT, chat(model="culturalign/committee", messages=user("word " * 400)), None, 400,
     "messages", "maximum context length"),
    ("body-too-large", "POST", CHAT, chat(messages=user("x" * 70000)), None, 413, None, "limit"),
    ("chunked-body-too-large", "POST", CHAT, chat(messages=user("x" * 70000)), "chunked", 413, None, "limit"),
    ("unknown-url", "POST", "/v1/completions", OK, None, 404, None, "Unknown request URL"),
    ("wrong-method", "GET", CHAT, None, None, 405, None, "not allowed"),
    # the survey
    ("survey-committee", "POST", SURVEY, {"model": "culturalign/committee"}, None, 400, "model", "one model"),
    ("survey-unknown-model", "POST", SURVEY, {"model": "nope"}, None, 404, "model", "nope"),
    ("survey-unknown-country", "POST", SURVEY, {"model": "tiny", "country": "Atlantis"}, None, 400, "country", "Atlantis"),
    ("survey-unknown-set", "POST", SURVEY, {"model": "tiny", "country": "CN", "targets": "hofstede-1999"}, None, 400,
     "targets", "hofstede-1999"),
    ("survey-unknown-index", "POST", SURVEY, {"model": "tiny", "constants": {"XYZ": 1}}, None, 400, "constants", "XYZ"),
    ("survey-constant-text", "POST", SURVEY, {"model": "tiny", "constants": {"PDI": "50"}}, None, 400, "constants.PDI", "number"),
    ("survey-unknown-prompt", "POST", SURVEY, {"model": "tiny", "prompt": "oracle"}, None, 400, "prompt", "oracle"),
    ("survey-persona-without-country", "POST", SURVEY, {"model": "tiny", "prompt": "persona"}, None, 400, "country", "country"),
    ("survey-prompt-for-an-expert", "POST", SURVEY, {"model": "culturalign/CN", "prompt": "icl"}, None, 400, "prompt", "expert"),
    ("survey-unknown-field", "POST", SURVEY, {"model": "tiny", "mode": "sample"}, None, 400, "mode", "unrecognized"),
]


def test_the_bad_input_table_is_large_and_unique():
    assert len(BAD) >= 50 and len({b[0] for b in BAD}) == len(BAD)


@pytest.mark.parametrize("method,path,body,headers,status,param,needle", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_its_4xx(live, method, path, body, headers, status, param, needle):
    chunked = headers == "chunked"
    got, _, data = live.raw(method, path, body, None if chunked else headers, chunked=chunked)
    assert got == status, data
    err = data["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
    assert err["param"] == param and needle in err["message"], err
    assert err["type"] == "invalid_request_error"
    assert "Traceback" not in json.dumps(data)
    assert live.raw("GET", "/health")[0] == 200  # and the server is fine


class Broken:
    """The tiny backend, except that generation fails as a broken model or device would."""

    def __init__(self, lm):
        self.lm = lm

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def generate(self, *args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered (simulated)")


def test_a_failing_model_is_a_500_without_details(tiny_lm, caplog):
    with serving(create_app(Broken(tiny_lm))) as s:
        with caplog.at_level(logging.INFO, logger="culturalign.serve"):
            status, _, data = s.raw("POST", CHAT, OK)
        assert status == 500 and data["error"]["type"] == "server_error"
        assert "CUDA" not in json.dumps(data) and "Traceback" not in json.dumps(data)
        assert any("CUDA" in (r.exc_text or "") for r in caplog.records)  # the server's log has it
        assert s.raw("GET", "/health")[0] == 200 and [m.id for m in s.client().models.list()] == ["tiny"]


def test_the_client_raises_its_own_error_classes(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="culturalign/XX", messages=user("Hi"))
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=user("Hi"), max_tokens=1000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=user("Hi"), n=3)


# ---- the survey endpoint ---------------------------------------------------------------------------------

def test_survey_of_the_base_model_and_of_an_expert(live, tiny_lm, committee, vsm):
    from culturalign.measure.survey import Survey
    from culturalign.measure.targets import load_target

    status, _, base = live.raw("POST", SURVEY, {"model": "tiny", "country": "CN", "prompt": "persona",
                                                "constants": {"PDI": 50}})
    assert status == 200
    want = Survey(tiny_lm, vsm, "persona", load_target("CN"), {"PDI": 50}).result(None, "persona").to_json()
    for key in ("model", "instrument", "prompt", "mode", "constants", "items", "indices", "target", "l1", "l1_dims",
                "missing_dims", "mean_option_mass"):
        assert base[key] == want[key], key
    status, _, jp = live.raw("POST", SURVEY, {"model": "culturalign/JP"})
    assert status == 200 and jp["prompt"] == "soft" and jp["target"]["iso2"] == "JP"  # its own culture by default
    expert = committee.registry["JP"]
    want = Survey(tiny_lm, vsm, "naive", load_target("JP")).result(expert.embeddings, "soft").to_json()
    assert jp["items"] == want["items"] and jp["l1"] == pytest.approx(want["l1"])
    assert jp["soft_prompt"]["n_tokens"] == 3 and jp["soft_prompt"]["sha256"] == expert.prompt.source["sha256"]
    assert jp["expert"] == "culturalign/JP"


# ---- logs -----------------------------------------------------------------------------------------------

def test_one_log_line_per_request(live, client, caplog):
    with caplog.at_level(logging.INFO, logger="culturalign.serve"):
        client.chat.completions.create(model="culturalign/US", messages=user("Hi"), max_tokens=2)
        live.raw("POST", CHAT, chat(model="nope"))
        live.raw("POST", CHAT, "{bad")
        deadline = time.monotonic() + 5  # a line is written once its response is sent: the client may be first
        while len(lines := [r.getMessage() for r in caplog.records if r.name == "culturalign.serve"]) < 3:
            assert time.monotonic() < deadline, lines
            time.sleep(0.01)
    assert len(lines) == 3, lines
    assert re.fullmatch(r"POST /v1/chat/completions model=culturalign/US status=200 prompt_tokens=\d+ completion_tokens=\d+ "
                        r"batch=1 latency_ms=[\d.]+", lines[0]), lines[0]
    assert "model=nope status=404" in lines[1] and "status=400" in lines[2]


# ---- host and settings -----------------------------------------------------------------------------------

@pytest.mark.parametrize("host,ok", [("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
                                     ("0.0.0.0", True), ("my-host.example", True), ("not a host!", False), ("", False),
                                     ("-bad.example", False), ("a" * 64, False)])
def test_check_host(host, ok):
    if ok:
        assert check_host(host)
    else:
        with pytest.raises(CulturalignError, match="--host"):
            check_host(host)


@pytest.mark.parametrize("kwargs,needle", [({"max_batch": 0}, "--max-batch"), ({"batch_window_ms": -1}, "--batch-window-ms"),
                                           ({"batch_window_ms": 5000}, "--batch-window-ms"), ({"timeout": 0}, "--timeout"),
                                           ({"timeout": float("nan")}, "--timeout"), ({"max_queue": 0}, "--max-queue"),
                                           ({"max_tokens_limit": 0}, "--max-tokens-limit"), ({"api_key": " "}, "--api-key"),
                                           ({"max_context": 1}, "--max-context")])
def test_serve_config_names_the_flag(kwargs, needle):
    with pytest.raises(CulturalignError, match=needle):
        ServeConfig(**kwargs)


def test_serve_command_wires_the_app(tiny_dir, tmp_path, monkeypatch, capsys):
    """`culturalign serve` on the tiny model: what it would serve, and the warning for an open host without a key."""
    from types import SimpleNamespace

    import culturalign.serve.server as listen
    from culturalign.cli import run

    reg = make_registry(tmp_path / "reg", SimpleNamespace(name=str(tiny_dir), hidden_size=32))
    served = {}

    def fake_run(app, sock):
        served.update(app=app, address=sock.getsockname())

    monkeypatch.setattr(listen, "run", fake_run)
    monkeypatch.setattr("culturalign.committee.router.Router.route", lambda self, *a, **k: None)  # no encoder load
    code = run(["serve", "--model", str(tiny_dir), "--experts", str(reg), "--host", "0.0.0.0", "--port", "0",
                "--max-batch", "4", "--timeout", "9"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "warning" in err and "without --api-key" in err and "/v1" in err
    srv = served["app"].state.server
    assert list(srv.models) == [str(tiny_dir), *EXPERTS, "culturalign/committee"]
    assert srv.config.max_batch == 4 and srv.config.timeout == 9 and srv.config.api_key is None
    assert served["address"][0] == "0.0.0.0" and served["address"][1] > 0
    # a local model without --experts has no registry: the base model alone, said once
    code = run(["serve", "--model", str(tiny_dir), "--port", "0", "--api-key", "k"])
    err = capsys.readouterr().err
    assert code == 0 and "base model alone" in err and "without --api-key" not in err
    assert list(served["app"].state.server.models) == [str(tiny_dir)]
    assert served["app"].state.server.config.api_key == "k"


def test_a_port_in_use_is_one_error(capsys):
    from culturalign.cli import run

    taken = bind("127.0.0.1", 0)
    try:
        code = run(["serve", "--model", "/nonexistent-model", "--experts", "/nonexistent", "--port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "does not exist" in err  # the registry is checked first
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(CulturalignError, match="cannot listen"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


# ---- the real command, in its own process: a committee answer over HTTP equals `culturalign ask` ----------------

def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _read_lines(stream, into: queue.Queue):
    for line in iter(stream.readline, ""):
        into.put(line)
    into.put(None)


def test_committee_over_http_equals_culturalign_ask(tiny_dir, tmp_path, capsys):
    """`culturalign serve` (a subprocess, the real sentence encoder and gate) against `culturalign ask`."""
    from types import SimpleNamespace

    from culturalign.cli import run

    reg = make_registry(tmp_path / "reg", SimpleNamespace(name=str(tiny_dir), hidden_size=32))
    proc = subprocess.Popen([sys.executable, "-m", "culturalign", "serve", "--model", str(tiny_dir), "--experts", str(reg),
                             "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    seen = []
    try:
        address = None
        deadline = time.monotonic() + 180
        while address is None:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            assert line is not None, "".join(seen)
            seen.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
            address = m.group(1) if m else None
        client = openai.OpenAI(base_url=address + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)
        cases = [("How should I greet my host's parents?", "JP", None),
                 ("What do people in China and Japan eat at new year?", None, None),
                 ("Elders must be obeyed.", "CN", "agree|undecided|disagree")]
        for i, (q, culture, options) in enumerate(cases):
            extra = {k: v for k, v in (("culture", culture), ("options", options and options.split("|"))) if v}
            r = client.chat.completions.create(model="culturalign/committee", messages=user(q), seed=0, extra_body=extra)
            argv = ["ask", q, "--model", str(tiny_dir), "--experts", str(reg), "--seed", "0", "--json", str(tmp_path / f"{i}.json")]
            argv += ["--culture", culture] if culture else []
            argv += ["--options", options] if options else []
            assert run(argv) == 0, capsys.readouterr().err
            want = json.loads((tmp_path / f"{i}.json").read_text())
            got = r.model_extra["culturalign"]
            for data in (want, got):
                data.pop("seconds")
            got.pop("ignored_messages")
            assert got == want
            text = want["answer"]["option"] if options else want["answer"]["text"]
            assert r.choices[0].message.content == text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        finally:
            proc.kill()
    rest = []
    while (line := lines.get(timeout=10)) is not None:
        rest.append(line)
    logs = [ln for ln in rest if "POST /v1/chat/completions" in ln]
    assert code == 0, "".join(seen + rest)
    assert len(logs) == 3 and all("model=culturalign/committee status=200" in ln and "latency_ms=" in ln for ln in logs)
