"""The one interface between a frozen language model and the rest of culturalign.

Shaped like lm-eval-harness's `LM`: a few batch methods, each taking a soft prompt per row.

- `option_distributions`: every prompt's next-token distribution over the answer-option tokens.
- `generate`: continuations of a batch of chat-rendered prompts.
- `loglikelihood`: token log-probabilities of texts (lm-eval's `loglikelihood_rolling`), e.g. for perplexity.

A soft prompt is a tensor of input embeddings [n, H] prepended at position 0, before the prompt's
first token, as PEFT's prompt tuning does. Nothing outside `culturalign.backends` touches the
model's embedding layer, its KV cache or its generation loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# What `option_distributions` accepts as soft prompts:
#   None: one row, no soft prompt;
#   a tensor [P, n, H]: P rows, all with soft prompts of length n;
#   a sequence of P items, each a tensor [n_p, H] or None: every row its own soft prompt (or none).
SoftPrompts = torch.Tensor | Sequence[torch.Tensor | None] | None


def common_prefix_len(seqs: list[list[int]]) -> int:
    if not seqs:
        return 0
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


@dataclass
class Distributions:
    probs: torch.Tensor  # [P, I, K] renormalized over the option tokens
    mass: torch.Tensor  # [P, I] probability on the option tokens before renormalizing

    def means(self, codes) -> torch.Tensor:
        return self.probs @ torch.as_tensor(codes, dtype=self.probs.dtype, device=self.probs.device)


class PromptSet:
    """Prompts asked together, and the plan for sharing their common prefixes (pure Python, no model).

    `sequences`: each prompt's token ids, ending where the answer goes. `groups`: indices of prompts
    that share a section (prompts in no group share only the root prefix). The plan:

        [soft prompt][ root ][ stage prefix ][ suffix ]
         per row      once    once per stage  per prompt

    `root` is the prefix common to all prompts; `stages` is a list of (prompt indices, the stage's
    shared ids after the root, [each prompt's remaining ids]). Every suffix keeps at least one token,
    the one whose next-token distribution is read.
    """

    def __init__(self, sequences: list[list[int]], groups: list[list[int]] | None = None):
        if not sequences or any(len(s) == 0 for s in sequences):
            raise ValueError("a prompt set needs at least one prompt, and every prompt at least one token")
        self.sequences = [list(s) for s in sequences]
        self.groups = None if groups is None else [list(g) for g in groups]
        self.n_items = len(sequences)
        self.root = sequences[0][: min(common_prefix_len(sequences), min(len(s) for s in sequences) - 1)]
        r = len(self.root)
        # Sections of two or more prompts share a stage; all other prompts share one last stage.
        multi = [list(g) for g in (groups or []) if len(g) > 1]
        in_multi = {i for g in multi for i in g}
        singles = [i for i in range(self.n_items) if i not in in_multi]
        stages = multi + ([singles] if singles else [])
        self.stages: list[tuple[list[int], list[int], list[list[int]]]] = []
        for g in stages:
            rest = [sequences[i][r:] for i in g]
            k = min(common_prefix_len(rest), min(len(x) for x in rest) - 1) if len(g) > 1 else 0
            self.stages.append((g, rest[0][:k], [x[k:] for x in rest]))
        # tokens the model processes per row without a soft prompt: shared, versus every prompt in full
        self.tokens_per_candidate = r + sum(len(p) + sum(len(s) for s in sx) for _, p, sx in self.stages)
        self.plain_tokens_per_candidate = sum(len(s) for s in sequences)

    def __len__(self) -> int:
        return self.n_items


@dataclass
class GenerationRequest:
    ids: list[int]  # prompt token ids (chat template already applied)
    soft: torch.Tensor | None = None  # [n, H] soft prompt for this row, or None


@dataclass
class LoglikelihoodRequest:
    """A text to score: the log-probability of each `continuation` token given everything before it.

    The row is `[soft prompt][context][continuation]`; `context` conditions the first continuation token
    and is not scored (e.g. the tokenizer's start token, so that a text is scored the same way with and
    without a soft prompt). `context` may be empty only when there is a soft prompt.
    """

    context: list[int]
    continuation: list[int]
    soft: torch.Tensor | None = None  # [n, H] soft prompt for this row, or None


@dataclass
class Generation:
    text: str  # the new tokens decoded, special tokens skipped
    token_ids: list[int]  # the new tokens, up to and including the end-of-sequence token if one came
    prompt_tokens: int  # positions the prompt took: soft prompt rows + prompt token ids
    new_tokens: int  # len(token_ids)
    finished: bool  # True if the model ended the sequence itself (EOS) within max_new_tokens


class TextStream:
    """Text deltas of a sequence that grows one token at a time (incremental detokenization, for streaming).

    Each `add(token)` decodes the whole sequence so far (special tokens skipped, as `Generation.text`) and returns
    the text not yet returned. A token that ends inside a multi-byte character decodes as U+FFFD until the
    character's last byte comes, so trailing U+FFFD are held back; a token that merges with the text before it
    changes the full decoding, not just its end, so deltas are cut from the full decoding, never from one token's.
    If a longer decoding no longer starts with what was already returned (a tokenizer that rewrites earlier text),
    nothing is returned until it does again. `strip=True` streams `text.strip()`: leading whitespace is dropped and
    trailing whitespace is held back until text follows it. The deltas concatenate to `rest(final)`'s prefix:
    `"".join(deltas) + rest(final) == final` for the final text.
    """

    def __init__(self, tokenizer, strip: bool = False):
        self.tokenizer, self.strip = tokenizer, strip
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).rstrip("\ufffd")
        if self.strip:
            text = text.strip()
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def rest(self, final: str) -> str:
        """What remains of the final text after the deltas returned so far ("" if they are not its prefix)."""
        return final[len(self.sent):] if final.startswith(self.sent) else ""


class Backend(ABC):
    """A frozen causal LM behind batch methods that take a soft prompt per row."""

    name: str
    tokenizer: object  # HF-style tokenizer; prompts are rendered with its chat template
    device: torch.device

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def hidden_size(self) -> int: ...

    @abstractmethod
    def embed(self, ids) -> torch.Tensor:
        """Frozen token embeddings of `ids` (a list of ids -> [L, H]), in the model's dtype and device."""

    @abstractmethod
    def embedding_table(self) -> torch.Tensor:
        """[V, H] the whole token embedding table, in the space `embed` returns (soft prompts live there: a model
        that scales its embeddings, as Gemma does by sqrt(hidden), has its table scaled): float32, on the CPU,
        detached. Callers copy what they change."""

    def input_gain(self) -> torch.Tensor | None:
        """[H] how strongly the first layer reads each input coordinate (its input norm's per-coordinate gain),
        or None where the backend cannot tell. A prior for black-box search directions (`sgn --directions gain`)."""
        return None

    @abstractmethod
    def model_info(self) -> dict:
        """num_layers, num_attention_heads, hidden_size, vocab_size, max_context (None where unknown)."""

    def prompt_set(self, sequences: list[list[int]], groups: list[list[int]] | None = None) -> PromptSet:
        """Prompts to be asked together; build once, ask many times."""
        return PromptSet(sequences, groups)

    @abstractmethod
    def option_distributions(self, prompts: PromptSet, option_ids: list[int], soft: SoftPrompts = None,
                             progress=None) -> Distributions:
        """Each row's distribution over `option_ids` as the next token after each prompt: [P, I, K] and [P, I].

        `soft`: None (one row, no soft prompt), a tensor [P, n, H], or a sequence of P items each a
        tensor [n_p, H] or None: every row may carry its own soft prompt, of its own length, or none.
        Differentiable with respect to the soft prompts when one of them requires grad.
        """

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest], *, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, num_return_sequences: int = 1,
                 on_step: Callable[[list[list[int | None]]], None] | None = None) -> list[list[Generation]]:
        """Continue every request (one batch, each row with its own soft prompt or none).

        Returns, per request, `num_return_sequences` generations. `temperature <= 0` is greedy (its
        copies are identical); otherwise pure sampling (no top-k / top-p), seeded by `seed`.

        `on_step(tokens)`: called on the generating thread after every decode step, as the step's tokens come out
        (for streaming), with `tokens[i][j]` the token just appended to request i's sequence j, or None where that
        sequence had already ended (its end-of-sequence token came in an earlier step). The tokens a sequence gets
        through `on_step` are exactly its `Generation.token_ids`; the callback changes nothing in the results.
        An exception raised by the callback ends the generation and propagates.
        """

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest], *, max_length: int | None = None,
                      progress=None) -> list[torch.Tensor]:
        """Each request's continuation token log-probabilities, a float32 tensor [len(continuation)] per request.

        Like lm-eval-harness's `loglikelihood_rolling`: a row longer than `max_length` positions (default:
        the model's context size) is scored in disjoint windows of continuation tokens, each window
        conditioned on as many of the tokens before it as fit, with the soft prompt at the start of every
        window. `progress(n)` is called with the number of windows scored so far. Differentiable with
        respect to a soft prompt that requires grad.
        """
        raise NotImplementedError(f"{type(self).__name__} does not compute log-likelihoods")
