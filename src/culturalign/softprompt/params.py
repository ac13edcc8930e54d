"""Soft prompt parameterisations: where a search starts and how its coordinates become a prompt.

- `initial_prompt`: the starting prompt p0 [n, hidden] (a text's token embeddings, vocabulary rows, or noise);
  `embedding_std` and `vocab_rows` read the model's embedding space.
- `FullPrompt`: the identity, x is the prompt flattened (`adam`, `sgn`).
- `Projection`: the black-box parameterisation of Black-Box Tuning (Sun et al., 2022): the prompt is
  `p0 + A z` with `z` in R^d and `A` a fixed Gaussian matrix drawn from a recorded seed, scaled so that
  for `z` uniform in [-b, b]^d each coordinate of `A z` has `sigma` times the embedding table's standard
  deviation (BBT uses sigma = 1; on SmolLM2-135M random directions of that size barely move the survey
  answers, see README "Design choices", so the default is larger).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from culturalign.backends import Backend
from culturalign.errors import CulturalignError
from culturalign.softprompt import INITS


def embedding_std(backend: Backend) -> float:
    """The standard deviation of the model's input embeddings (`Backend.embedding_table`, the space `embed` returns)."""
    return float(backend.embedding_table().std())


VOCAB_ROWS = 8192  # the most frequent tokens (BPE ids are roughly in merge order): the pool of real tokens


def vocab_rows(backend: Backend, n: int = VOCAB_ROWS):
    """[V, hidden] float64 numpy: the embeddings of the first `n` vocabulary rows, without special tokens."""
    table = backend.embedding_table()
    special = set(getattr(backend.tokenizer, "all_special_ids", []) or [])
    ids = [i for i in range(min(n, table.shape[0])) if i not in special]
    return table[ids].double().numpy()


def initial_prompt(backend: Backend, n: int, how: str = "text", text: str | None = None, seed: int = 0) -> torch.Tensor:
    """[n, hidden] starting prompt: a text's token embeddings (cycled/cut to n), sampled vocabulary rows, or noise.

    All three are in the space the model's own tokens enter it (`Backend.embedding_table`): a `text` prompt
    answers as the text given as tokens at position 0 does, also on models that scale their embeddings (Gemma)."""
    if n < 1:
        raise CulturalignError(f"--tokens must be at least 1, got {n}")
    table = backend.embedding_table()
    g = torch.Generator().manual_seed(seed)
    if how == "text":
        ids = backend.tokenizer(text or "", add_special_tokens=False)["input_ids"]
        if not ids:
            raise CulturalignError("soft prompt init 'text' needs a non-empty text")
        ids = (ids * math.ceil(n / len(ids)))[:n]
        return table[ids].clone()
    if how == "vocab":
        return table[torch.randint(0, min(table.shape[0], 5000), (n,), generator=g)].clone()
    if how == "random":
        return torch.randn(n, table.shape[1], generator=g) * table.std()
    raise CulturalignError(f"unknown soft prompt init {how!r}; expected one of {', '.join(INITS)}")


class Projection:
    """prompt(z) = p0 + A z, z in [-bound, bound]^d; A Gaussian from `seed`, or scaled identity if d = n*hidden."""

    def __init__(self, p0: torch.Tensor, dim: int, seed: int, emb_std: float, bound: float = 1.0, sigma: float = 1.0):
        self.p0, self.shape, self.dim, self.seed, self.bound = p0.float(), tuple(p0.shape), dim, seed, bound
        full = p0.numel()
        self.check_dim(dim, full)
        if sigma <= 0:
            raise CulturalignError(f"--sigma must be positive, got {sigma}")
        self.sigma = sigma
        z_std = bound / math.sqrt(3.0)  # std of U(-b, b)
        target_std = sigma * emb_std  # per-coordinate std of A z
        if dim == full:
            self.A = None
            self.scale = target_std / z_std
        else:
            g = torch.Generator().manual_seed(seed)
            self.A = torch.randn(full, dim, generator=g) * (target_std / (math.sqrt(dim) * z_std))

    @staticmethod
    def check_dim(dim: int, full: int) -> None:
        if not 1 <= dim <= full:
            raise CulturalignError(f"--dim must be between 1 and {full} (tokens x hidden size), got {dim}")

    def __call__(self, z) -> torch.Tensor:
        """[P, d] (numpy or torch) -> [P, n, hidden] prompts."""
        z = torch.as_tensor(z, dtype=torch.float32)
        if z.dim() == 1:
            z = z.unsqueeze(0)
        delta = z * self.scale if self.A is None else z @ self.A.T
        return self.p0.unsqueeze(0) + delta.view(-1, *self.shape)


class FullPrompt:
    """The identity parameterisation: x is the prompt [n, hidden] flattened."""

    def __init__(self, p0: torch.Tensor):
        self.p0, self.shape, self.dim = p0.float(), tuple(p0.shape), p0.numel()

    def __call__(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        return x.reshape(-1, *self.shape)

    def x0(self) -> np.ndarray:
        return self.p0.flatten().double().numpy()
