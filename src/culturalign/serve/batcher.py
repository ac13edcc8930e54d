"""The request queue: one worker thread owns the model; requests that arrive together share one forward pass.

The HTTP side (asyncio) never touches the model or its tokenizer. It puts a job in the queue and
awaits the job's `concurrent.futures.Future` (wrapped with `asyncio.wrap_future`), so the event loop
stays free to accept, validate and answer other requests while the model works.

Two kinds of jobs:

- **generation** (chat with the base model or an expert): the worker renders the messages with the
  tokenizer's chat template, checks the context length, and runs ONE `Backend.generate` call for a
  whole batch, each row with its own soft prompt (the expert's, or none). Experts mix in one batch.
- **call** (a committee answer, a survey): a function run on the worker as it is. `Committee.ask`
  already batches its experts in one call; it is not merged with other requests, so that the
  answer is exactly the one `culturalign ask` gives.

Batching. When the worker is idle and a generation job arrives, it waits `window` seconds for others
(unless `max_batch` compatible jobs are already queued), then takes up to `max_batch` of them in
arrival order. Jobs are compatible when one `generate` call can serve them all:

    temperature 0 (greedy)       all together, whatever their seeds and max_tokens
    sampling, no seed            together when their temperatures are equal (one drawn seed per batch)
    sampling with a seed         alone, so that the same seed gives the same answer whatever else is queued

A batch generates up to its largest max_tokens and each row is cut to its own (greedy decoding of a
row does not depend on how long the batch runs). Under load the worker does not wait: the queue
already holds the next batch while the current one runs.

Streaming. A job with a `stream` callback gets its row's text as it is decoded: after every decode step
of the batch's one `generate` call (`on_step`), the worker detokenizes each streaming row incrementally
(`TextStream`: whole characters only) and calls its `stream(delta)`, up to the row's own max_tokens and
end of sequence; rows that do not stream, in the same batch, are untouched. The job's future still
gets the whole `GenerationResult`, after the last delta; its `text` is what the deltas add up to
(`TextStream.rest` gives what is left, if anything).

Limits. At most `max_queue` jobs wait (those running not counted); `submit` raises `QueueFull`
beyond that. A job whose future is cancelled while it waits (its request timed out) leaves the
queue at once and is never run; one already running cannot be interrupted and finishes unseen.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from culturalign.errors import CulturalignError

log = logging.getLogger("culturalign.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` waiting jobs."""


class ContextTooLong(CulturalignError):
    """A prompt (with its soft prompt and max_tokens) does not fit the context."""


@dataclass
class GenerationJob:
    """A chat to continue: its messages (role/content dicts), the soft prompt of its row, its settings."""

    messages: list[dict]
    soft: torch.Tensor | None
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    max_context: int | None = None  # the server's cap; the model's own context applies too
    fit: bool = False  # max_tokens is the server's default, not the client's: shrink it to the room left
    stream: Callable[[str], None] | None = None  # called on the worker thread with each text delta as it is decoded


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int  # positions the prompt took: soft prompt rows + prompt token ids
    completion_tokens: int
    finished: bool  # the model ended the text itself (finish_reason "stop"), not max_tokens ("length")
    batch_size: int  # rows in the generate call that produced it
    queued_s: float  # seconds the job waited before its batch started


@dataclass
class _Job:
    future: Future
    arrived: float
    key: tuple | None  # generation jobs: which jobs may share its generate call; None for a call
    work: GenerationJob | Callable[[], object]


@dataclass
class Stats:
    batches: int = 0  # generate calls
    rows: int = 0  # generation jobs served by them
    largest_batch: int = 0
    calls: int = 0  # committee answers, surveys
    rejected: int = 0  # QueueFull
    dropped: int = 0  # cancelled while waiting (timed out), never run
    busy_s: float = 0.0  # seconds the worker spent on jobs
    batch_sizes: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "largest_batch": self.largest_batch, "calls": self.calls,
                "rejected": self.rejected, "dropped": self.dropped, "busy_s": round(self.busy_s, 3),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


def render_chat(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template, ready for the assistant's turn.

    A template that refuses a system turn gets the system text folded into the first user turn
    (as `prompts.render` does for survey items).
    """
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as first:  # jinja raises TemplateError (and templates raise their own errors)
        system = [m["content"] for m in messages if m["role"] == "system"]
        rest = [dict(m) for m in messages if m["role"] != "system"]
        users = [m for m in rest if m["role"] == "user"]
        if not system or not users:
            raise CulturalignError(f"the model's chat template refused these messages ({str(first)[:200]})") from None
        users[0]["content"] = "\n\n".join(system + [users[0]["content"]])
        try:
            text = tokenizer.apply_chat_template(rest, tokenize=False, add_generation_prompt=True)
        except Exception as second:
            raise CulturalignError(f"the model's chat template refused these messages ({str(second)[:200]})") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Batcher:
    """A bounded FIFO queue and the one thread that runs the model for it.

    `window`: seconds to wait for a batch to fill; `max_batch`: rows per `generate` call (1 = no
    batching); `max_queue`: jobs that may wait.
    """

    def __init__(self, backend, max_batch: int = 16, window: float = 0.01, max_queue: int = 64):
        self.backend, self.max_batch, self.window, self.max_queue = backend, max_batch, window, max_queue
        self.stats = Stats()
        self._pending: list[_Job] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._solo = itertools.count()
        self._context = (backend.model_info() or {}).get("max_context")

    # -- the asyncio side: submit and forget -------------------------------------------------------
    def submit_generation(self, job: GenerationJob) -> Future:
        if job.temperature <= 0:
            key = ("greedy",)
        elif job.seed is not None:
            key = ("seeded", next(self._solo))  # alone: a seed must reproduce its answer
        else:
            key = ("sample", float(job.temperature))
        return self._submit(key, job)

    def submit_call(self, fn: Callable[[], object]) -> Future:
        return self._submit(None, fn)

    def _submit(self, key, work) -> Future:
        fut: Future = Future()
        job = _Job(fut, time.perf_counter(), key, work)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._pending)} requests are already waiting (limit {self.max_queue})")
            self._pending.append(job)
            self._cond.notify_all()
        fut.add_done_callback(lambda f, j=job: self._forget(j) if f.cancelled() else None)
        return fut

    def _forget(self, job: _Job) -> None:
        """A cancelled job leaves the queue at once (it was still waiting: running jobs cannot be cancelled)."""
        with self._cond:
            if job in self._pending:
                self._pending.remove(job)
                self.stats.dropped += 1

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="culturalign-model", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running job, fail the waiting ones, and end the thread."""
        with self._cond:
            self._stopping = True
            left, self._pending = self._pending, []
            self._cond.notify_all()
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(QueueFull("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- the worker --------------------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        """The next call job alone, or the next batch of compatible generation jobs; None when stopping."""
        # Only this thread removes jobs it runs; `_forget` (another thread) removes cancelled ones.
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending[0]
            if first.key is None:
                return [self._pending.pop(0)]
            deadline = first.arrived + self.window
            while True:
                group = [j for j in self._pending if j.key == first.key][: self.max_batch]
                now = time.perf_counter()
                if first not in self._pending:
                    return []  # it was cancelled while the window was open: start again
                if len(group) >= self.max_batch or now >= deadline or self._stopping:
                    break
                self._cond.wait(deadline - now)
            group = [j for j in self._pending if j.key == first.key][: self.max_batch]
            for j in group:
                self._pending.remove(j)
            return group

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            taken = len(jobs)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
            self.stats.dropped += taken - len(jobs)
            if not jobs:
                continue
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    if jobs[0].key is None:
                        self._run_call(jobs[0])
                    else:
                        self._run_batch(jobs, t0)
            except BaseException as e:  # never let the worker die with futures unanswered
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                log.exception("model worker: unexpected error")
            finally:
                self.stats.busy_s += time.perf_counter() - t0

    def _run_call(self, job: _Job) -> None:
        self.stats.calls += 1
        try:
            job.future.set_result(job.work())
        except Exception as e:
            job.future.set_exception(e)

    def _prepare(self, job: GenerationJob) -> list[int]:
        ids = render_chat(self.backend.tokenizer, job.messages)
        soft = 0 if job.soft is None else int(job.soft.shape[0])
        limits = [n for n in (job.max_context, self._context) if n]
        limit = min(limits) if limits else None
        if limit is not None and job.fit and soft + len(ids) < limit:
            job.max_tokens = min(job.max_tokens, limit - soft - len(ids))
        if limit is not None and soft + len(ids) + job.max_tokens > limit:
            raise ContextTooLong(
                f"this model's maximum context length is {limit} tokens; the messages take {len(ids)} tokens"
                + (f" and the expert's soft prompt {soft}" if soft else "")
                + f", and max_tokens asks for {job.max_tokens} more: shorten the messages or lower max_tokens"
            )
        return ids

    def _run_batch(self, jobs: list[_Job], started: float) -> None:
        from culturalign.backends import GenerationRequest, TextStream

        rows, requests = [], []
        for j in jobs:
            try:
                requests.append(GenerationRequest(self._prepare(j.work), j.work.soft))
                rows.append(j)
            except Exception as e:  # one bad request fails alone, not its batch
                j.future.set_exception(e)
        if not rows:
            return
        first: GenerationJob = rows[0].work
        seed = first.seed if first.seed is not None else (0 if first.temperature <= 0 else random.randrange(2**31))
        longest = max(j.work.max_tokens for j in rows)
        backend = self.backend
        streams = {i: TextStream(backend.tokenizer) for i, j in enumerate(rows) if j.work.stream is not None}

        def on_step(tokens: list[list[int | None]]) -> None:
            for i, text in streams.items():
                job, t = rows[i].work, tokens[i][0]
                if t is None or job.stream is None or len(text.ids) >= job.max_tokens:
                    continue
                delta = text.add(t)
                if delta:
                    try:
                        job.stream(delta)
                    except Exception:  # a client gone (its event loop closed): the batch goes on without it
                        log.debug("a stream callback failed; the row stops streaming", exc_info=True)
                        job.stream = None

        try:
            out = backend.generate(requests, max_new_tokens=longest, temperature=first.temperature, seed=seed,
                                   **({"on_step": on_step} if streams else {}))
        except Exception as e:
            for j in rows:
                j.future.set_exception(e)
            return
        n = len(rows)
        self.stats.batches += 1
        self.stats.rows += n
        self.stats.largest_batch = max(self.stats.largest_batch, n)
        self.stats.batch_sizes[n] = self.stats.batch_sizes.get(n, 0) + 1
        tok = backend.tokenizer
        for j, (g, *_) in zip(rows, out):
            k = j.work.max_tokens
            if g.new_tokens > k:  # the batch ran longer than this row asked for: cut it
                ids, text, finished = g.token_ids[:k], tok.decode(g.token_ids[:k], skip_special_tokens=True), False
            else:
                ids, text, finished = g.token_ids, g.text, g.finished
            j.future.set_result(GenerationResult(text=text, token_ids=ids, prompt_tokens=g.prompt_tokens,
                                                 completion_tokens=len(ids), finished=finished, batch_size=n,
                                                 queued_s=started - j.arrived))
