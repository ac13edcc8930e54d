"""The OpenAI-compatible app: `create_app(backend, committee, config)` from objects already loaded.

Long because: the OpenAI-compatible routes, their request checks and the streaming responses (token by token,
or the whole answer) share one app and its error handling.

Routes:

    GET  /health                      liveness, the model, queue depth and batching counters (no key needed)
    GET  /v1/models                   the base model, each expert (culturalign/CN, ...) and culturalign/committee
    GET  /v1/models/{id}              one of them
    POST /v1/chat/completions         messages, max_tokens, temperature, seed, stream, n = 1 (+ culture, options)
    POST /v1/culturalign/survey       the survey JSON contract (`culturalign survey --json`) of the base model or an expert

Models:

- the **base model** (its name, e.g. `smollm2-135m`) and each **expert** (`culturalign/<CODE>`) continue
  the chat: the messages are rendered with the model's chat template, and an expert's soft prompt is
  put before them. These requests are batched together (see `batcher.py`).
- **culturalign/committee** answers the last user message with `Committee.ask`, the code path of
  `culturalign ask`: the same query, culture, options and seed give the same answer. Routing and each
  expert's answer come back in the response's extra field `culturalign` (the JSON `ask --json`
  writes), which standard clients ignore. Earlier messages are not seen by the committee; their
  count is reported as `culturalign.ignored_messages`. For the committee, max_tokens means what
  `ask --max-new-tokens` means: each expert's answer; a composed reply may take up to 64.

The user's culture comes from the body field `culture` or the header `X-Culturalign-Culture` (both:
they must agree). The committee routes by it; for the base model and experts it is checked and
echoed in `culturalign.culture`, and does not change the answer (an expert already is a culture).

Errors are OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`: 400 for
malformed JSON and bad parameters (also too many messages, max_tokens over the limit, a prompt
longer than the context: code `context_length_exceeded`), 401 for a missing or wrong API key, 404
for an unknown model or URL, 413 for a body over the limit, 503 when the queue is full, 504 when a
request runs out of time. A bug is a 500 with a generic message; no response carries a traceback.

`stream: true` answers with server-sent events in OpenAI's chunk format (`chat.completion.chunk`,
then `data: [DONE]`), token by token: each row of a batch sends its text as it is decoded (whole
characters; see `batcher.py`), while the batch's other rows go on in the same forward passes. The
committee streams its reply as it is decoded too, which for a composed reply means once every expert
has answered (the composition needs their answers); an options answer comes whole. An error before
the first token is an HTTP error as without streaming; after it, an `{"error": ...}` event ends the
stream. `ServeConfig.stream_mode = "answer"` restores whole-answer streaming (the answer generated
first, then sent in chunks), kept for `benchmarks/serve.py` to compare against.

One log line per request on the `culturalign.serve` logger: method, path, model, status, prompt and
completion tokens, batch size and latency.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from culturalign.errors import CulturalignError
from culturalign.serve.batcher import Batcher, ContextTooLong, GenerationJob, GenerationResult, QueueFull
from culturalign.serve.config import ServeConfig
from culturalign.serve.schemas import ChatCompletionRequest, SurveyRequest, first_error

log = logging.getLogger("culturalign.serve")

COMMITTEE_ID = "culturalign/committee"
EXPERT_PREFIX = "culturalign/"
CULTURE_HEADER = "x-culturalign-culture"
COMPOSE_MIN_TOKENS = 64  # as `culturalign ask`: the composed reply gets max(--max-new-tokens, 64)


class APIError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass
class ServedModel:
    id: str
    kind: str  # base | expert | committee
    expert: object | None = None  # committee.experts.Expert

    def card(self, created: int, extra: dict) -> dict:
        return {"id": self.id, "object": "model", "created": created, "owned_by": "culturalign", "culturalign": extra}


# ---- the front door: API key, body size, one log line per request ----------------------------------------

class Guard:
    """ASGI middleware in front of every route: the API key (constant-time comparison), the declared
    body size (413 before reading), and one log line per request once its response is sent."""

    def __init__(self, app, config: ServeConfig):
        self.app, self.config = app, config
        self.key = config.api_key.encode("utf-8") if config.api_key else None

    def _refuse(self, scope) -> APIError | None:
        headers = {k.lower(): v for k, v in scope.get("headers", [])}  # raw bytes, as sent
        if self.key is not None and scope["path"].startswith("/v1"):
            auth = headers.get(b"authorization", b"").strip()
            scheme, _, given = auth.partition(b" ")
            if not auth or scheme.lower() != b"bearer":
                return APIError(401, "You didn't provide an API key. Provide it in an Authorization header using Bearer "
                                     "auth (Authorization: Bearer YOUR_KEY).", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(given.strip(), self.key):  # constant time: no early exit on the first wrong byte
                return APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        declared = headers.get(b"content-length")
        if declared is not None:
            declared = declared.decode("latin-1")
            if not declared.strip().isdigit():
                return APIError(400, f"Content-Length {declared[:40]!r} is not a number")
            if int(declared) > self.config.max_body_bytes:
                return APIError(413, f"the request body is {int(declared)} bytes; the limit is {self.config.max_body_bytes}",
                                code="request_too_large")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        state = scope.setdefault("state", {})
        status = {"code": 500}

        async def watched(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, watched)
            else:
                await self.app(scope, receive, watched)
        finally:
            info = state.get("log") or {}
            ms = (time.perf_counter() - t0) * 1000
            parts = [f"{scope.get('method', '-')} {scope.get('path', '-')}", f"model={info.get('model', '-')}",
                     f"status={status['code']}"]
            for key in ("prompt_tokens", "completion_tokens", "batch"):
                if key in info:
                    parts.append(f"{key}={info[key]}")
            parts.append(f"latency_ms={ms:.1f}")
            log.info(" ".join(parts))


# ---- the app ---------------------------------------------------------------------------------------------

class Server:
    """What the routes need: the backend, the committee (or None), the models served, the queue."""

    def __init__(self, backend, committee=None, config: ServeConfig | None = None, instrument=None):
        from culturalign.measure.instrument import load_instrument

        self.backend, self.committee = backend, committee
        self.config = config or ServeConfig()
        self.instrument = instrument or load_instrument("vsm2013")
        self.batcher = Batcher(backend, self.config.max_batch, self.config.batch_window_ms / 1000, self.config.max_queue)
        self.created = int(time.time())
        model_context = (backend.model_info() or {}).get("max_context")
        self.max_context = min(self.config.max_context, model_context) if model_context else self.config.max_context
        self.models: dict[str, ServedModel] = {backend.name: ServedModel(backend.name, "base")}
        if committee is not None:
            for code, expert in committee.registry.experts.items():
                self.models[EXPERT_PREFIX + code] = ServedModel(EXPERT_PREFIX + code, "expert", expert)
            self.models[COMMITTEE_ID] = ServedModel(COMMITTEE_ID, "committee")

    # -- models ----------------------------------------------------------------------------------------
    def card(self, m: ServedModel) -> dict:
        if m.kind == "base":
            extra = {"kind": "base", "hidden_size": self.backend.hidden_size, "max_context": self.max_context}
        elif m.kind == "expert":
            e = m.expert
            extra = {"kind": "expert", "culture": e.code, "name": e.name, "soft_prompt_tokens": int(e.embeddings.shape[0]),
                     "target_set": (e.info.get("target") or {}).get("set"), "naive_l1": e.info.get("naive_l1"),
                     "aligned_l1": e.info.get("aligned_l1"), "optimizer": e.info.get("optimizer")}
        else:
            extra = {"kind": "committee", "experts": list(self.committee.registry.codes),
                     "top_k": self.committee.router.config.top_k}
        return m.card(self.created, extra)

    def model(self, name: str) -> ServedModel:
        if name not in self.models:
            known = ", ".join(self.models)
            raise APIError(404, f"The model {name!r} does not exist. Models served here: {known}", param="model",
                           code="model_not_found")
        return self.models[name]

    # -- requests --------------------------------------------------------------------------------------
    async def read_json(self, request: Request, schema):
        """The body as `schema`, or an APIError: 413 past the size limit, 400 for anything not a valid object."""
        limit, size, chunks = self.config.max_body_bytes, 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body.strip():
            raise APIError(400, "the request body is empty; send a JSON object")

        def reject(constant):
            raise ValueError(f"{constant} is not JSON")

        try:
            data = json.loads(body, parse_constant=reject)
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            detail = ("not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "nested too deeply"
                      if isinstance(e, RecursionError) else str(e))
            raise APIError(400, f"We could not parse the JSON body of your request ({detail[:120]}). "
                                "Send a JSON object, e.g. {\"model\": ..., \"messages\": [...]}.") from None
        if not isinstance(data, dict):
            raise APIError(400, f"the request body must be a JSON object, not a {type(data).__name__}")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            message, param = first_error(e)
            raise APIError(400, message, param=param) from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply") from None

    def culture(self, request: Request, body_value: str | None) -> str | None:
        header = request.headers.get(CULTURE_HEADER)
        header = header.strip() if header is not None else None
        if header == "":
            raise APIError(400, "the X-Culturalign-Culture header is empty", param="culture")
        if body_value is not None and header is not None:
            a, b = self._resolve_culture(body_value), self._resolve_culture(header)
            if a != b:
                raise APIError(400, f"culture {body_value!r} and header X-Culturalign-Culture {header!r} disagree; send one",
                               param="culture")
            return a
        given = body_value if body_value is not None else header
        return None if given is None else self._resolve_culture(given)

    def _resolve_culture(self, value: str) -> str:
        if self.committee is None:
            return value.strip()
        try:
            return self.committee.resolve_culture(value)
        except CulturalignError as e:
            raise APIError(400, str(e).replace("--culture", "culture"), param="culture") from None

    async def wait(self, future, started: float):
        """The job's result, awaited without blocking the loop; 504 when the request's time is up."""
        left = self.config.timeout - (time.perf_counter() - started)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(left, 0.001))
        except (TimeoutError, asyncio.TimeoutError):
            raise timed_out(self.config.timeout) from None
        except ContextTooLong as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        except QueueFull as e:
            raise overloaded(str(e)) from None
        except CulturalignError as e:
            raise APIError(400, str(e)) from None
        except Exception:  # a bug or a broken model: logged here, never shown to the client
            log.exception("the model worker failed on a request")
            raise APIError(500, "The server had an error while processing your request.", type="server_error") from None

    def submit(self, fn, *args):
        try:
            return fn(*args)
        except QueueFull as e:
            raise overloaded(str(e)) from None


def timed_out(timeout: float) -> APIError:
    return APIError(504, f"the request did not finish within the server's timeout of {timeout:g} s; "
                         "try again, or with a smaller max_tokens", type="timeout_error", code="timeout")


def overloaded(detail: str) -> APIError:
    return APIError(503, f"the server is busy: {detail}. Retry in a moment.", type="server_error", code="queue_full",
                    headers={"Retry-After": "1"})


def _pieces(text: str) -> list[str]:
    """The text cut before each word (whitespace kept): chunks that concatenate to exactly the text."""
    return [p for p in re.split(r"(?<=\s)(?=\S)", text) if p] or [""]


def _content(chunk: dict, text: str) -> dict:
    return {**chunk, "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]}


class Deltas:
    """Text deltas pushed by the model worker's thread (`push`), read in order on the event loop, then None once
    the job's future is done (the worker pushes every delta before it sets the result, and both travel through
    `call_soon_threadsafe`, so none is lost or reordered)."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.watched = False

    def push(self, delta: str | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)

    async def next(self, srv: "Server", future, started: float) -> str | None:
        """The next delta, or None when the job is done; 504 when the request's time is up."""
        if not self.watched:
            self.watched = True
            future.add_done_callback(lambda f: self._closed(None))
        left = srv.config.timeout - (time.perf_counter() - started)
        try:
            return await asyncio.wait_for(self.queue.get(), timeout=max(left, 0.001))
        except (TimeoutError, asyncio.TimeoutError):
            future.cancel()  # leaves the queue if it is still waiting; a running job finishes unseen
            raise timed_out(srv.config.timeout) from None

    async def first(self, srv: "Server", future, started: float) -> str | None:
        """The first delta (None: the job ended without one); the job's error, if it failed first, as `wait` gives it."""
        delta = await self.next(srv, future, started)
        if delta is None:
            await srv.wait(future, started)  # raises the job's error as an APIError
        return delta

    def _closed(self, _) -> None:
        try:
            self.push(None)
        except RuntimeError:  # the event loop is gone (the server stopped)
            pass


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(',', ':'))}\n\n"


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _fingerprint() -> str:
    from culturalign import __version__

    return f"culturalign-{__version__}"


def create_app(backend, committee=None, config: ServeConfig | None = None, instrument=None) -> FastAPI:
    """The FastAPI app serving `backend` (and, with a committee, its experts and the committee).

    Everything is passed in already loaded, so tests can serve a tiny model and registry. The model
    worker thread starts and stops with the app's lifespan.
    """
    srv = Server(backend, committee, config, instrument)

    @asynccontextmanager
    async def lifespan(app):
        srv.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(srv.batcher.stop)  # lets the running job finish without blocking the loop

    app = FastAPI(title="culturalign", description="Cultural experts and their committee, OpenAI-compatible.",
                  lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    app.add_middleware(Guard, config=srv.config)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_response(404, f"Unknown request URL: {request.method} {request.url.path}. Please check the URL "
                                       "for typos.", code="unknown_url")
        if exc.status_code == 405:
            return error_response(405, f"Method {request.method} is not allowed for {request.url.path}.",
                                  code="method_not_allowed")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return error_response(400, "invalid request: " + "; ".join(str(e.get("msg")) for e in exc.errors())[:300])

    @app.exception_handler(Exception)
    async def _bug(request, exc: Exception):
        return error_response(500, "The server had an error while processing your request.", type="server_error")

    def noted(request: Request, **info) -> None:
        request.state.log = {**(getattr(request.state, "log", None) or {}), **info}

    # -- routes ----------------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": backend.name, "experts": len(srv.models) - 1 - (committee is not None),
                "queue": {"waiting": srv.batcher.waiting, "max_queue": srv.config.max_queue,
                          "max_batch": srv.config.max_batch, "batch_window_ms": srv.config.batch_window_ms},
                "stats": srv.batcher.stats.to_json()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [srv.card(m) for m in srv.models.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        return srv.card(srv.model(model_id))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        started = time.perf_counter()
        req = await srv.read_json(request, ChatCompletionRequest)
        noted(request, model=req.model)
        m = srv.model(req.model)
        cfg = srv.config
        if len(req.messages) > cfg.max_messages:
            raise APIError(400, f"messages: {len(req.messages)} messages; the limit is {cfg.max_messages}", param="messages")
        max_tokens = req.limit  # None: the server's default (the committee: its own)
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            param = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
            raise APIError(400, f"{param} is {max_tokens}; this server allows at most {cfg.max_tokens_limit}", param=param)
        temperature = cfg.default_temperature if req.temperature is None else req.temperature
        culture = srv.culture(request, req.culture)
        live = Deltas() if req.stream and cfg.stream_mode == "tokens" else None
        if m.kind == "committee":
            future, reply = _committee_job(req, culture, max_tokens, temperature, live)
        else:
            if req.options is not None:
                raise APIError(400, f"options are answered by {COMMITTEE_ID}; model {m.id!r} continues the chat",
                               param="options")
            job = GenerationJob(messages=[{"role": x.chat_role, "content": x.content} for x in req.messages],
                                soft=None if m.expert is None else m.expert.embeddings,
                                max_tokens=max_tokens or cfg.default_max_tokens, temperature=temperature, seed=req.seed,
                                max_context=srv.max_context, fit=max_tokens is None,
                                stream=None if live is None else live.push)
            future = srv.submit(srv.batcher.submit_generation, job)

            def reply(r: GenerationResult):
                extra = {"model_kind": m.kind, "culture": culture, "batch_size": r.batch_size,
                         "queued_ms": round(r.queued_s * 1000, 1)}
                if m.expert is not None:
                    extra.update(expert=m.expert.code, soft_prompt_tokens=int(m.expert.embeddings.shape[0]))
                usage = {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens}
                return r.text, "stop" if r.finished else "length", usage, extra

        head = {"id": _completion_id(), "created": int(time.time()), "model": m.id, "system_fingerprint": _fingerprint()}
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        if live is not None:  # token by token: errors before the first delta are still HTTP errors
            first = await live.first(srv, future, started)
            return StreamingResponse(_live_stream(request, head, first, live, future, reply, include_usage, started),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, finish, usage, extra = finished(request, reply(await srv.wait(future, started)))
        if req.stream:  # stream_mode "answer": the whole answer, then its chunks
            return StreamingResponse(_stream(head, text, finish, usage, extra, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish}],
                "usage": usage, "culturalign": extra}

    def finished(request: Request, answer: tuple) -> tuple:
        """The reply (text, finish, usage, extra) with its total tokens, noted for the request's log line."""
        text, finish, usage, extra = answer
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        noted(request, prompt_tokens=usage["prompt_tokens"], completion_tokens=usage["completion_tokens"],
              **({"batch": extra["batch_size"]} if "batch_size" in extra else {}))
        return text, finish, usage, extra

    def _committee_job(req: ChatCompletionRequest, culture, max_tokens, temperature, live):
        """Committee.ask on the worker, exactly as `culturalign ask` calls it: its future, and its reply maker."""
        from culturalign.committee.compose import check_options

        last = req.messages[-1]
        if last.role != "user":
            raise APIError(400, f"{COMMITTEE_ID} answers the last message, which must be the user's (it is {last.role!r})",
                           param="messages")
        try:
            options = check_options(req.options) if req.options is not None else None
        except CulturalignError as e:
            raise APIError(400, str(e).replace("--options", "options"), param="options") from None
        overrides = {"temperature": float(temperature)}
        if req.seed is not None:
            overrides["seed"] = req.seed
        if max_tokens is not None:
            overrides.update(max_new_tokens=max_tokens, compose_max_new_tokens=max(max_tokens, COMPOSE_MIN_TOKENS))
        base = committee
        limit = srv.max_context

        def ask():
            c = copy.copy(base)
            c.config = replace(base.config, **overrides)
            n = len(backend.tokenizer(last.content, add_special_tokens=False)["input_ids"])
            if n + c.config.max_new_tokens > limit:
                raise ContextTooLong(f"this server's maximum context length is {limit} tokens; the question takes {n} "
                                     f"tokens and max_tokens asks for {c.config.max_new_tokens} more")
            return c.ask(last.content, culture=culture, options=options, system="committee",
                         on_text=None if live is None else live.push)

        def reply(answer):
            data = answer.to_json()
            data["ignored_messages"] = len(req.messages) - 1
            if options is not None:
                text, finish = answer.answer["option"], "stop"
            else:
                text, finish = answer.answer["text"], "stop" if answer.answer.get("finished") else "length"
            usage = {"prompt_tokens": int(answer.tokens.get("prompt", 0)),
                     "completion_tokens": int(answer.tokens.get("generated", 0))}
            return text, finish, usage, data

        return srv.submit(srv.batcher.submit_call, ask), reply

    async def _stream(head, text, finish, usage, extra, include_usage):
        """The whole answer, already generated, cut into chunks (`stream_mode` "answer")."""
        chunk = {**head, "object": "chat.completion.chunk"}
        yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                          "finish_reason": None}]})
        for piece in _pieces(text):
            if piece:
                yield _sse(_content(chunk, piece))
        yield _sse({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}],
                    "culturalign": extra})
        if include_usage:
            yield _sse({**chunk, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    async def _live_stream(request, head, first, live, future, reply, include_usage, started):
        """Each text delta as the worker decodes it (`stream_mode` "tokens"), then what the final text adds (if
        anything), the finish reason and usage. A failure after the first delta can only be an error event."""
        chunk = {**head, "object": "chat.completion.chunk"}
        yield _sse({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                          "finish_reason": None}]})
        sent, delta = [], first
        try:
            while delta is not None:
                sent.append(delta)
                yield _sse(_content(chunk, delta))
                delta = await live.next(srv, future, started)
            text, finish, usage, extra = finished(request, reply(await srv.wait(future, started)))
        except APIError as e:
            yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
            yield "data: [DONE]\n\n"
            return
        so_far = "".join(sent)
        rest = text[len(so_far):] if text.startswith(so_far) else ""
        if rest:
            yield _sse(_content(chunk, rest))
        yield _sse({**chunk, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}],
                    "culturalign": extra})
        if include_usage:
            yield _sse({**chunk, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    @app.post("/v1/culturalign/survey")
    async def survey(request: Request):
        started = time.perf_counter()
        req = await srv.read_json(request, SurveyRequest)
        noted(request, model=req.model)
        m = srv.model(req.model)
        if m.kind == "committee":
            raise APIError(400, f"the survey measures one model: {backend.name!r} or an expert such as "
                                f"'{EXPERT_PREFIX}CN'; {COMMITTEE_ID} has no single profile", param="model")
        from culturalign.measure.survey import Survey
        from culturalign.measure.targets import BUILTIN_SETS, Target, load_target

        try:
            constants = srv.instrument.constants(req.constants or {})
        except CulturalignError as e:
            raise APIError(400, str(e), param="constants") from None
        if req.targets not in BUILTIN_SETS:
            raise APIError(400, f"unknown target set {req.targets!r}; expected one of {', '.join(BUILTIN_SETS)}", param="targets")
        try:
            target = load_target(req.country, req.targets) if req.country is not None else None
        except CulturalignError as e:
            raise APIError(400, str(e).replace("--country", "country"), param="country") from None
        if m.kind == "expert":
            if req.prompt is not None:
                raise APIError(400, f"prompt applies to the base model; expert {m.id!r} is surveyed with the profile it "
                                    "was aligned with", param="prompt")
            sp = m.expert.prompt
            profile, label, soft = sp.meta.get("prompt", "naive"), "soft", sp.embeddings
            if target is None and isinstance(m.expert.info.get("target"), dict):
                target = Target.from_json(m.expert.info["target"])
        else:
            profile = req.prompt or "naive"
            label, soft = profile, None
            if profile != "naive" and target is None:
                raise APIError(400, f"prompt {profile!r} needs a country", param="country")
        inst = srv.instrument

        def run():
            result = Survey(backend, inst, profile, target, constants).result(soft, label)
            if m.kind == "expert":
                result.extra["soft_prompt"] = {"path": m.expert.code, "sha256": (sp.source or {}).get("sha256"),
                                               "n_tokens": int(soft.shape[0])}
                result.extra["expert"] = m.id
            return result.to_json()

        data = await srv.wait(srv.submit(srv.batcher.submit_call, run), started)
        from culturalign.files import find_non_finite

        if find_non_finite(data):
            raise APIError(500, "the survey produced a non-finite number", type="server_error")
        return data

    return app
