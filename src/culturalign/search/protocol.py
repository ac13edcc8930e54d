"""The search protocol: an `Objective` maps candidates to an `Evaluation`; an `Optimizer` asks and is told.

Shaped like pycma's `OOOptimizer` and scipy's solver-as-iterator:

    while not opt.stop() and nfev + len(opt.ask()) <= budget:
        X = opt.ask()                                   # [P, d] candidates (asking twice gives the same X)
        opt.tell(X, objective(X, opt.needs_gradient))   # loss [P], residuals [P, k], mass [P], grad [P, d]?

`culturalign.search.loop.minimize` is that loop, the only one: it owns the budget rule, the
best-so-far record, the history, checkpoints and progress. Optimizers only propose points.

State is JSON-safe (`state_dict` / `load_state_dict`), so a run checkpoints after every batch and
resumes to the bit-identical result. Optimizers whose engine cannot export its state (pycma, DFO-LS)
resume by *replay*: their state is the log of what they were told, and loading it feeds the same
answers back to a fresh engine with the same seed, without a single model call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Evaluation:
    """What the objective says about a batch of P candidates."""

    loss: np.ndarray  # [P] the scalar being minimised (L1 + option-mass penalty)
    residuals: np.ndarray  # [P, k] signed index residuals (model - target) on the target's known dimensions
    mass: np.ndarray  # [P] mean probability the model puts on the answer options
    l1: np.ndarray  # [P] L1 distance alone (sum of |residuals|)
    grad: np.ndarray | None = None  # [P, d] d loss / d x, only when asked for

    def __post_init__(self):
        self.loss = np.asarray(self.loss, dtype=float).reshape(-1)
        self.mass = np.asarray(self.mass, dtype=float).reshape(-1)
        self.l1 = np.asarray(self.l1, dtype=float).reshape(-1)
        self.residuals = np.asarray(self.residuals, dtype=float).reshape(len(self.loss), -1)
        if not (len(self.loss) == len(self.mass) == len(self.l1)):
            raise ValueError("an Evaluation needs one loss, mass and l1 per candidate")

    def __len__(self) -> int:
        return len(self.loss)

    def row(self, i: int) -> dict:
        return {"loss": float(self.loss[i]), "l1": float(self.l1[i]), "mass": float(self.mass[i]),
                "residuals": [float(r) for r in self.residuals[i]]}


class Objective(Protocol):
    """A batch function: candidates [P, dim] -> Evaluation. `need_grad` asks for the gradient too."""

    dim: int

    def __call__(self, X: np.ndarray, need_grad: bool = False) -> Evaluation: ...


class Optimizer(ABC):
    """One search method behind ask/tell. Minimises; candidates live in R^dim (a box for black-box methods)."""

    name: str = ""
    needs_gradient: bool = False  # tell() needs Evaluation.grad
    resume: str = "native"  # how it resumes mid-run: "native" (its own state) or "replay" (its told log)

    def __init__(self, dim: int, seed: int = 0):
        self.dim, self.seed = dim, seed
        self.nfev = 0
        self.generation = 0

    @abstractmethod
    def ask(self) -> np.ndarray:
        """[P, dim] the next candidates; calling it again before tell() returns the same points."""

    @abstractmethod
    def tell(self, X: np.ndarray, evaluation: Evaluation) -> None:
        """Report the evaluation of the points of the last ask()."""

    def stop(self) -> bool:
        """True when the method has nothing more to try (converged); the loop then ends early."""
        return False

    @abstractmethod
    def state_dict(self) -> dict:
        """JSON-safe state; `load_state_dict` of it continues bit-identically."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def _check_tell(self, X: np.ndarray, pending: np.ndarray | None, evaluation: Evaluation) -> None:
        if pending is None or np.shape(X) != pending.shape or not np.array_equal(np.asarray(X), pending):
            raise ValueError(f"{self.name}: tell() must get the points of the last ask()")
        if len(evaluation) != len(pending):
            raise ValueError(f"{self.name}: tell() needs one evaluation per point of the last ask()")


class ReplayOptimizer(Optimizer):
    """Base for engines whose internal state cannot be exported: the state is the told log, replayed on load.

    Subclasses implement `_start()` (a fresh engine from `self.seed`), `_ask()` and `_tell(X, evaluation)`.
    """

    resume = "replay"

    def __init__(self, dim: int, seed: int = 0):
        super().__init__(dim, seed)
        self._pending: np.ndarray | None = None
        self._log: list[dict] = []  # [{"X": [[...]], "loss": [...], "residuals": [[...]], "mass": [...], "l1": [...]}]
        self._start()

    @abstractmethod
    def _start(self) -> None: ...

    @abstractmethod
    def _ask(self) -> np.ndarray: ...

    @abstractmethod
    def _tell(self, X: np.ndarray, evaluation: Evaluation) -> None: ...

    def ask(self) -> np.ndarray:
        if self._pending is None:
            self._pending = np.asarray(self._ask(), dtype=float).reshape(-1, self.dim)
        return self._pending.copy()

    def tell(self, X: np.ndarray, evaluation: Evaluation) -> None:
        self._check_tell(X, self._pending, evaluation)
        pending, self._pending = self._pending, None
        self._tell(pending, evaluation)
        self._log.append({"X": pending.tolist(), "loss": evaluation.loss.tolist(), "l1": evaluation.l1.tolist(),
                          "mass": evaluation.mass.tolist(), "residuals": evaluation.residuals.tolist()})
        self.nfev += len(pending)
        self.generation += 1

    def state_dict(self) -> dict:
        return {"name": self.name, "dim": self.dim, "seed": self.seed, "log": self._log}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name or state.get("dim") != self.dim or state.get("seed") != self.seed:
            raise ValueError(f"state is for {state.get('name')!r} (dim {state.get('dim')}, seed {state.get('seed')}), "
                             f"not {self.name!r} (dim {self.dim}, seed {self.seed})")
        self.close()
        self.nfev, self.generation, self._pending, self._log = 0, 0, None, []
        self._start()
        for step in state["log"]:
            X = np.asarray(step["X"], dtype=float)
            asked = self.ask()
            if asked.shape != X.shape or not np.allclose(asked, X, rtol=0, atol=1e-12):
                raise ValueError(f"{self.name}: replaying the log gave different points at evaluation {self.nfev + 1}; "
                                 "the engine's version or the seed changed")
            self.tell(asked, Evaluation(step["loss"], step["residuals"], step["mass"], step["l1"]))

    def close(self) -> None:
        """Release engine resources (threads); the default has none."""
