"""DFO-LS (Cartis, Fiala, Marteau & Roberts, 2019): derivative-free Gauss-Newton on the index residuals.

Still black-box (it reads only the model's answers), but it models every signed index residual,
not one scalar: from d + 1 surveys it fits a linear model of the k residuals and takes trust-region
Gauss-Newton steps. It minimises the sum of squares of [residuals..., penalty], whose minimiser is
the L1 objective's whenever the target can be reached exactly.

`dfols.solve` owns its loop (it calls the objective), so it runs in a greenlet: its objective
switches back to `ask()` with each point and resumes when `tell()` switches in with the residuals.
A greenlet is a coroutine in the same thread, so the hand-off costs microseconds and nothing runs
concurrently. When DFO-LS stops (its trust region shrank to `rhoend`, or the residuals vanished) it
restarts from the best point so far with the initial radius, so a run always spends its budget.
Initial directions are the coordinate axes (no random numbers), so replay is exact.

DFO-LS is GPL-3.0-or-later, so it is an optional extra (`pip install 'culturalign[dfols]'`), imported
only here, when a search runs; without it `DFOLS(...)` (and `--optimizer dfols`) is one error saying so.
"""

from __future__ import annotations

import numpy as np

from culturalign.search.protocol import Evaluation, ReplayOptimizer


class _Abort(Exception):
    pass


class DFOLS(ReplayOptimizer):
    name = "dfols"

    def __init__(self, dim: int, seed: int = 0, bound: float = 1.0, rhobeg: float = 0.3, rhoend: float = 1e-3,
                 maxfun: int = 10_000):
        # maxfun only caps each solve() (DFO-LS allocates in proportion to it); the loop's budget rules.
        from culturalign.search.registry import dfols_missing
        from culturalign.errors import CulturalignError

        if dfols_missing():
            raise CulturalignError(dfols_missing())
        self.bound, self.rhobeg, self.rhoend, self.maxfun = bound, rhobeg, rhoend, maxfun
        self._solver = None
        super().__init__(dim, seed)

    # -- the solver coroutine -------------------------------------------------------------------
    def _start(self) -> None:
        from greenlet import greenlet

        self.restarts = 0
        self.best_x, self.best_f = np.zeros(self.dim), np.inf
        self._solver = greenlet(self._solve)
        self._next_msg: tuple = self._solver.switch()  # runs until the first point (or a failure)

    def _residuals(self, x: np.ndarray) -> np.ndarray:
        answer = self._solver.parent.switch(("x", np.array(x, dtype=float)))
        if answer is None:
            raise _Abort
        return answer

    def _solve(self) -> tuple:
        import dfols  # the optional extra (GPL-3.0-or-later); __init__ has checked it is installed

        lower, upper = np.full(self.dim, -self.bound), np.full(self.dim, self.bound)
        params = {"init.random_initial_directions": False, "logging.save_diagnostic_info": False}
        x0 = np.zeros(self.dim)
        try:
            while True:
                dfols.solve(self._residuals, x0, bounds=(lower, upper), rhobeg=self.rhobeg * self.bound,
                            rhoend=self.rhoend * self.bound, maxfun=self.maxfun, user_params=params,
                            scaling_within_bounds=False, do_logging=False)
                self.restarts += 1
                x0 = self.best_x.copy()
        except _Abort:
            return ("closed", None)
        except Exception as e:  # a solver failure ends the search cleanly; the loop reports it
            return ("error", repr(e))

    # -- ask / tell -----------------------------------------------------------------------------
    def _ask(self) -> np.ndarray:
        kind, x = self._next_msg
        if kind != "x":
            raise RuntimeError(f"DFO-LS stopped: {x}")
        return x[None, :]

    def _tell(self, X: np.ndarray, evaluation: Evaluation) -> None:
        res = np.append(evaluation.residuals[0], float(evaluation.loss[0] - evaluation.l1[0]))  # + the penalty
        if not np.all(np.isfinite(res)):
            res = np.full_like(res, 1e150)
        f = float(evaluation.loss[0])
        if f < self.best_f:
            self.best_x, self.best_f = X[0].copy(), f
        self._next_msg = self._solver.switch(res)

    def stop(self) -> bool:
        return self._next_msg[0] != "x"

    def close(self) -> None:
        if self._solver is not None and not self._solver.dead:
            self._solver.switch(None)  # raises _Abort inside the solver, which returns
        self._solver = None
