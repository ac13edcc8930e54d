"""The server's limits and defaults, in one validated dataclass (the CLI reads its defaults from here).

Every limit exists so that one client cannot take the model away from the others for long:

    max_batch         rows in one `Backend.generate` call. Requests that arrive together share one
                      forward pass per generated token; 1 turns batching off (one request at a time).
    batch_window_ms   how long the worker waits, after the first request of a batch arrives, for
                      others to join it. A few milliseconds cost little next to a generation (hundreds
                      of milliseconds on a CPU); under load the queue already holds a full batch and
                      the worker does not wait at all.
    max_queue         requests waiting for the worker (not counting those it is running). One more is
                      answered 503 at once, with Retry-After, instead of waiting without bound.
    timeout           seconds from a request's arrival to its answer. Past it the client gets 504; a
                      request still waiting in the queue is dropped, one already running finishes and
                      its answer is discarded (a forward pass cannot be interrupted).
    max_body_bytes    largest request body (413 beyond it, before it is read in full).
    max_messages      most chat messages in one request.
    max_tokens_limit  the largest max_tokens a request may ask for.
    default_max_tokens  max_tokens when a request gives none (the base model and experts), shortened
                      to the room the context leaves.
    max_context       prompt tokens (soft prompt included) + max_tokens must fit in this many
                      positions, and never more than the model's own context.
    default_temperature  temperature when a request gives none: 0, greedy, so that the same request
                      gives the same answer, as `culturalign ask` does (OpenAI's default is 1).
    stream_mode       "tokens": `stream: true` sends each token as it is decoded; "answer": the whole
                      answer is generated first, then sent in chunks (the old way, kept for
                      `benchmarks/serve.py` to compare against; no command-line flag).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from culturalign.errors import CulturalignError

STREAM_MODES = ("tokens", "answer")


@dataclass
class ServeConfig:
    max_batch: int = 16
    batch_window_ms: float = 10.0
    max_queue: int = 64
    timeout: float = 120.0
    max_body_bytes: int = 1_048_576
    max_messages: int = 64
    max_tokens_limit: int = 512
    default_max_tokens: int = 128
    max_context: int = 2048
    default_temperature: float = 0.0
    api_key: str | None = None
    stream_mode: str = "tokens"

    def __post_init__(self):
        """Check every field; errors name the command-line flag (or the field, for those without one)."""
        for flag, value, low in (("--max-batch", self.max_batch, 1), ("--max-queue", self.max_queue, 1),
                                 ("max_body_bytes", self.max_body_bytes, 1024), ("max_messages", self.max_messages, 1),
                                 ("--max-tokens-limit", self.max_tokens_limit, 1), ("default_max_tokens", self.default_max_tokens, 1),
                                 ("--max-context", self.max_context, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise CulturalignError(f"{flag} must be an integer >= {low}, got {value!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            self.default_max_tokens = self.max_tokens_limit
        for flag, value, low, open_low in (("--batch-window-ms", self.batch_window_ms, 0.0, False),
                                           ("--timeout", self.timeout, 0.0, True),
                                           ("default_temperature", self.default_temperature, 0.0, False)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value <= low if open_low else value < low):
                raise CulturalignError(f"{flag} must be a finite number {'>' if open_low else '>='} {low:g}, got {value!r}")
        if self.batch_window_ms > 1000:
            raise CulturalignError(f"--batch-window-ms must be at most 1000 (a window of seconds only adds latency), got {self.batch_window_ms}")
        if self.default_temperature > 2:
            raise CulturalignError(f"default_temperature must be in [0, 2], got {self.default_temperature}")
        if self.stream_mode not in STREAM_MODES:
            raise CulturalignError(f"stream_mode must be one of {', '.join(STREAM_MODES)}, got {self.stream_mode!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise CulturalignError("--api-key is empty; give a key, or leave the option out to serve without one")
