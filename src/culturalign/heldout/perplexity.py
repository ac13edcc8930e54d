"""Capability check: perplexity of a neutral text with and without a soft prompt.

The text is scored as plain text (no chat template), as lm-eval scores WikiText: the row is
`[soft prompt][start token][text]` and every text token is scored given everything before it, so the
rows with and without the soft prompt score exactly the same tokens. The start token is the
tokenizer's BOS token, or its EOS token when it has no BOS. perplexity = exp(mean negative log-likelihood
per text token). A prompt that leaves the model's general language ability alone keeps the ratio
(with / without) near 1; a large ratio means the prompt costs capability.

The shipped text (`data/heldout/neutral.txt`) is plain encyclopedic prose written for culturalign,
about no culture in particular.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import torch

from culturalign.backends import LoglikelihoodRequest
from culturalign.errors import CulturalignError

BUILTIN_TEXT = "culturalign/data/heldout/neutral.txt"


def load_text(path: str | Path | None = None) -> tuple[str, str]:
    """(text, source): the shipped neutral text (None) or a user's UTF-8 text file; empty text is an error."""
    if path is None:
        text, source = resources.files("culturalign.data.heldout").joinpath("neutral.txt").read_text("utf-8"), BUILTIN_TEXT
    else:
        from culturalign.files import read_text_file

        text, source = read_text_file(path, "text file", "a UTF-8 text file"), str(path)
    if not text.strip():
        raise CulturalignError(f"text file {source!r} is empty; perplexity needs some text")
    return text.strip(), source


def start_token(tokenizer) -> int:
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tok is None:
        raise CulturalignError("the tokenizer has neither a BOS nor an EOS token to start the text with")
    return int(tok)


def perplexity(backend, text: str, softs: list[torch.Tensor | None], max_length: int | None = None,
               progress=None) -> list[dict]:
    """For each entry of `softs` (None = no soft prompt): tokens scored, mean NLL (nats/token) and perplexity."""
    ids = backend.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise CulturalignError("the text has no tokens")
    start = [start_token(backend.tokenizer)]
    rows = [None if s is None else (s if s.dim() == 2 else s[0]) for s in softs]
    with torch.no_grad():
        logps = backend.loglikelihood([LoglikelihoodRequest(start, ids, s) for s in rows], max_length=max_length,
                                      progress=progress)
    out = []
    for lp in logps:
        nll = float(-lp.double().mean())
        if not math.isfinite(nll):
            raise CulturalignError("the model's log-likelihood of the text is NaN or infinite; its inputs (e.g. a soft "
                                   "prompt) or weights are broken")
        out.append({"tokens": len(ids), "nll": nll, "perplexity": math.exp(nll)})
    return out
