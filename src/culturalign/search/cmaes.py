"""CMA-ES through pycma (`cma`), the usual engine of Black-Box Tuning (Sun et al., 2022).

pycma's state holds numpy objects and its own random stream, so it is not exported: the optimizer
resumes by replaying its told log into a fresh `CMAEvolutionStrategy` with the same seed (exact:
pycma is deterministic given its seed and the values it is told).
"""

from __future__ import annotations

import numpy as np

from culturalign.search.protocol import Evaluation, ReplayOptimizer


class CMAES(ReplayOptimizer):
    """pycma's CMA-ES on the box [-bound, bound]^dim, starting at z = 0 (the initial prompt) with step sigma0 * bound."""

    name = "cmaes"

    def __init__(self, dim: int, seed: int = 0, popsize: int = 6, bound: float = 1.0, sigma0: float = 0.3):
        self.popsize, self.bound, self.sigma0 = popsize, bound, sigma0
        super().__init__(dim, seed)

    def _start(self) -> None:
        import cma

        opts = {"popsize": self.popsize, "seed": self.seed + 1,  # pycma treats seed 0 as "from the clock"
                "bounds": [-self.bound, self.bound], "verbose": -9, "verb_log": 0, "verb_disp": 0,
                "tolfun": 0, "tolflatfitness": 10**9, "tolfunhist": 0, "tolx": 0, "tolstagnation": 10**9}
        self.es = cma.CMAEvolutionStrategy(np.zeros(self.dim), self.sigma0 * self.bound, opts)

    def _ask(self) -> np.ndarray:
        return np.array(self.es.ask(), dtype=float)

    def _tell(self, X: np.ndarray, evaluation: Evaluation) -> None:
        loss = np.where(np.isfinite(evaluation.loss), evaluation.loss, 1e300)
        self.es.tell(list(X), loss.tolist())

    def stop(self) -> bool:
        return bool(self.es.stop())
