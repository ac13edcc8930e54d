"""The one search loop: every optimizer runs through `minimize`.

It owns what each method used to copy: the budget rule (a batch that would pass the budget is not
evaluated), the best-so-far record (point, loss, L1, option mass), the per-batch history, the
checkpoint after every batch, and progress reports. Resuming passes the checkpoint's `LoopState`
back in; because optimizer state is restored exactly, a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.optimize import OptimizeResult

from culturalign.search.protocol import Evaluation, Objective, Optimizer


@dataclass
class LoopState:
    """Everything the loop needs to continue: the optimizer's state, the best point so far, the history."""

    optimizer: dict
    best: dict | None = None  # {"x": [...], "loss", "l1", "mass", "residuals"}
    history: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"optimizer": self.optimizer, "best": self.best, "history": self.history}

    @classmethod
    def from_json(cls, state: dict) -> "LoopState":
        return cls(state["optimizer"], state.get("best"), list(state["history"]))


def minimize(objective: Objective, optimizer: Optimizer, budget: int, *, state: LoopState | None = None,
             checkpoint: Callable[[LoopState], None] | None = None, progress: Callable[[dict], None] | None = None,
             clock: Callable[[], float] | None = None, restore: bool = True) -> OptimizeResult:
    """Run `optimizer` on `objective` until `budget` evaluations (or until it stops); scipy-style result.

    `state`: a `LoopState` from a checkpoint to continue; its optimizer state is loaded here unless
    `restore=False` (the caller loaded it already, e.g. to report a damaged checkpoint its own way).
    `checkpoint(state)` is called after every batch; `progress(entry)` with each history entry.
    `clock()` gives the seconds recorded in the history (default: since this call).
    """
    t0 = time.perf_counter()
    clock = clock or (lambda: time.perf_counter() - t0)
    if state is not None:
        if restore:
            optimizer.load_state_dict(state.optimizer)
        best, history = state.best, list(state.history)
    else:
        best, history = None, []
    message = "evaluation budget used"
    try:
        while True:
            if optimizer.stop():
                message = f"{optimizer.name} stopped before the budget (converged)"
                break
            X = optimizer.ask()
            if optimizer.nfev + len(X) > budget:
                break
            ev = objective(X, need_grad=optimizer.needs_gradient)
            optimizer.tell(X, ev)
            best = _update_best(best, X, ev)
            history.append({
                "generation": optimizer.generation, "evaluations": optimizer.nfev, "best_loss": best["loss"],
                "best_l1": best["l1"], "best_option_mass": best["mass"],
                "mean_loss": float(np.mean(ev.loss)) if np.all(np.isfinite(ev.loss)) else float("inf"),
                "seconds": round(clock(), 2),
            })
            if checkpoint is not None:
                checkpoint(LoopState(optimizer.state_dict(), best, history))
            if progress is not None:
                progress(history[-1])
    finally:
        close = getattr(optimizer, "close", None)
        if close is not None:
            close()
    if best is None:
        return OptimizeResult(x=None, fun=math.inf, nfev=optimizer.nfev, nit=optimizer.generation, success=False,
                              message="the budget is smaller than the optimizer's first batch", history=history)
    return OptimizeResult(x=np.asarray(best["x"]), fun=best["loss"], l1=best["l1"], mass=best["mass"],
                          residuals=np.asarray(best["residuals"]), nfev=optimizer.nfev, nit=optimizer.generation,
                          success=math.isfinite(best["loss"]), message=message, history=history,
                          state=LoopState(optimizer.state_dict(), best, history))


def _update_best(best: dict | None, X: np.ndarray, ev: Evaluation) -> dict:
    """The best point so far: strictly lower loss wins, so the first of equal points is kept."""
    loss = np.where(np.isfinite(ev.loss), ev.loss, np.inf)
    i = int(np.argmin(loss))
    if best is None or loss[i] < best["loss"]:
        return {"x": [float(v) for v in np.asarray(X[i])], **ev.row(i), "loss": float(loss[i])}
    return best
