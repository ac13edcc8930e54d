"""Random search: uniform points in the box, the floor every method must beat."""

from __future__ import annotations

import numpy as np

from culturalign.search.protocol import Evaluation, Optimizer


class RandomSearch(Optimizer):
    """`popsize` uniform points in [-bound, bound]^dim per ask; the first batch includes z = 0 (the initial prompt)."""

    name = "random"

    def __init__(self, dim: int, seed: int = 0, popsize: int = 6, bound: float = 1.0):
        super().__init__(dim, seed)
        self.popsize, self.bound = popsize, bound
        self.rng = np.random.default_rng(seed)
        self._pending: np.ndarray | None = None

    def ask(self) -> np.ndarray:
        if self._pending is None:
            X = self.rng.uniform(-self.bound, self.bound, (self.popsize, self.dim))
            if self.nfev == 0:
                X[0] = 0.0
            self._pending = X
        return self._pending.copy()

    def tell(self, X: np.ndarray, evaluation: Evaluation) -> None:
        self._check_tell(X, self._pending, evaluation)
        self.nfev += len(self._pending)
        self.generation += 1
        self._pending = None

    def state_dict(self) -> dict:
        return {"dim": self.dim, "seed": self.seed, "popsize": self.popsize, "bound": self.bound, "nfev": self.nfev,
                "generation": self.generation, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.nfev, self.generation, self._pending = state["nfev"], state["generation"], None
