"""Request bodies, as pydantic models with their fixed limits; `first_error` turns a failure into one line.

The models are strict: a number must be a JSON number (not "0.5"), a flag a JSON boolean, and
fields that are not listed are refused (a typo such as `temprature` is an error, not silently
ignored). Limits that depend on the server's settings (message count, max_tokens, context) are
checked by the app against `ServeConfig`.

Standard OpenAI fields that this server does not implement are accepted only at their neutral
value, so that clients that always send them keep working while a request that really asks for the
feature is told it is not there: `n` must be 1, `top_p` 1, `presence_penalty` and
`frequency_penalty` 0, `stop` empty, `logprobs` false. `user` is accepted and ignored (it is an
end-user id for abuse monitoring).

culturalign's own fields (the `openai` client sends them with `extra_body={...}`):

    culture   the user's culture, a code or name ("JP", "Japan"); the committee routes by it. The
              header `X-Culturalign-Culture` does the same.
    options   answer options ("agree", "disagree", ...): the committee answers with a distribution
              over them, as `culturalign ask --options` does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_TEXT = 1_000_000  # characters in one message; the body size limit is the real bound
MAX_SEED = 2**63 - 1

Temperature = Annotated[float, Field(ge=0.0, le=2.0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Message(_Strict):
    """One chat turn. `content` is a string or a list of text parts ({"type": "text", "text": ...})."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    name: Annotated[str, Field(max_length=256)] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value):
        if isinstance(value, list):
            parts = []
            for i, part in enumerate(value):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise ValueError(f"part {i} is {kind!r}: only text content is supported")
                parts.append(part["text"])
            value = "".join(parts)
        if isinstance(value, str) and len(value) > MAX_TEXT:
            raise ValueError(f"a message may hold at most {MAX_TEXT} characters")
        return value

    @property
    def chat_role(self) -> str:
        """OpenAI's newer `developer` role is the system turn of a chat template."""
        return "system" if self.role == "developer" else self.role


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=512)]
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # newer clients' name for max_tokens
    temperature: Temperature | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    # culturalign's own
    culture: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    options: Annotated[list[Annotated[str, Field(min_length=1, max_length=500)]], Field(min_length=2, max_length=9)] | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, value):
        if value != 1:
            raise ValueError("must be 1: one choice per request")
        return value

    @field_validator("top_p", "presence_penalty", "frequency_penalty")
    @classmethod
    def _neutral(cls, value, info):
        neutral = 1.0 if info.field_name == "top_p" else 0.0
        if value is not None and value != neutral:
            raise ValueError(f"not supported: leave it out or send {neutral:g}")
        return value

    @field_validator("stop", "logprobs")
    @classmethod
    def _unsupported(cls, value):
        if value:
            raise ValueError("not supported: leave it out")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ; send one of them")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens


class SurveyRequest(_Strict):
    """`POST /v1/culturalign/survey`: the VSM 2013 survey of the base model or of one expert.

    `country` (a code or name) and `targets` (hofstede-2015 or hofstede-2023) pick the target the
    profile is compared with; an expert defaults to its own culture. `prompt` is the profile for the
    base model (naive, persona, icl); an expert is surveyed with the profile it was aligned with.
    `constants` sets index constants, e.g. {"PDI": 50}.
    """

    model: Annotated[str, Field(min_length=1, max_length=512)]
    country: Annotated[str, Field(min_length=1, max_length=100)] | None = None
    targets: Annotated[str, Field(min_length=1, max_length=100)] = "hofstede-2015"
    prompt: Literal["naive", "persona", "icl"] | None = None
    constants: Annotated[dict[Annotated[str, Field(max_length=16)], Annotated[float, Field(allow_inf_nan=False)]],
                         Field(max_length=16)] | None = None


def _path(loc) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def first_error(err: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the first problem in a failed validation, in OpenAI's words where it has some."""
    e = err.errors(include_url=False)[0]
    param = _path(e.get("loc", ())) or None
    kind = e.get("type")
    if kind == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if kind == "missing":
        return f"missing required parameter: {param!r}", param
    msg = str(e.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    where = f"{param}: " if param else ""
    shown = e.get("input")
    tail = "" if kind in ("value_error",) or isinstance(shown, (dict, list)) else f" (got {shown!r:.60})"
    return f"{where}{msg}{tail}", param
