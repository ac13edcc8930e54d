"""Differential Evolution (the paper's method), with exactly resumable state.

`DEEngine` is a small ask/tell engine (Storn & Price 1997) rather than
`scipy.optimize.differential_evolution`, because a long alignment run must checkpoint and resume
to the bit-identical result: its whole state (population, fitness, generation, evaluations used,
and the numpy `Generator`'s bit state) is a JSON-serialisable dict. It follows scipy's conventions
(strategies `rand1bin`, `best1bin`, `currenttobest1bin`, `rand2bin`; F may be a (min, max) pair
dithered per generation; out-of-bounds trial components are resampled uniformly; one crossover
component is always taken from the mutant; synchronous "deferred" updating as with scipy's
`vectorized=True`), and `tests/test_optimizers.py` checks it against scipy on standard functions.
Results are `scipy.optimize.OptimizeResult` objects.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
from scipy.optimize import OptimizeResult

from culturalign.errors import ConfigError, CulturalignError
from culturalign.errors import field as F
from culturalign.search.protocol import Evaluation, Optimizer

STRATEGIES = ("rand1bin", "best1bin", "currenttobest1bin", "rand2bin")
NEEDS = {"rand1bin": 3, "best1bin": 2, "currenttobest1bin": 2, "rand2bin": 5}  # distinct partners per trial


@dataclass
class DEConfig:
    popsize: int = 16  # individuals (absolute, not scipy's multiplier)
    mutation: float | tuple[float, float] = (0.5, 1.0)  # F, or (min, max) dithered per generation
    crossover: float = 0.9  # CR
    strategy: str = "best1bin"
    bound: float = 1.0  # search box [-bound, bound]^d
    include_origin: bool = True  # seed the population with z = 0 (the initial prompt itself)

    def __post_init__(self):
        if self.popsize < 4:
            raise ConfigError(f"{F('popsize')} must be at least 4 for DE, got {self.popsize}")
        if self.strategy not in STRATEGIES:
            raise CulturalignError(f"unknown DE strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}")
        if self.popsize < NEEDS[self.strategy] + 1:
            raise CulturalignError(
                f"DE strategy {self.strategy} needs a population of at least {NEEDS[self.strategy] + 1}, got {self.popsize}"
            )
        fs = self.mutation if isinstance(self.mutation, (tuple, list)) else (self.mutation,)
        if not all(0 < f <= 2 for f in fs) or (len(fs) == 2 and fs[0] > fs[1]):
            raise ConfigError(f"{F('mutation')} (DE F) must be in (0, 2], or a 'min,max' pair within it, got {self.mutation}")
        if not 0 <= self.crossover <= 1:
            raise ConfigError(f"{F('crossover')} (DE CR) must be in [0, 1], got {self.crossover}")
        if not (0 < self.bound < float("inf")):
            raise ConfigError(f"{F('bound')} (DE box) must be a finite positive number, got {self.bound}")


class DEEngine:
    """The DE engine: ask/tell DE on the box [-bound, bound]^dim (or explicit `lower`/`upper`). Minimises."""

    def __init__(self, dim: int, config: DEConfig | None = None, seed: int = 0,
                 lower: np.ndarray | None = None, upper: np.ndarray | None = None):
        self.config = config or DEConfig()
        self.dim = dim
        b = self.config.bound
        self.lower = np.full(dim, -b) if lower is None else np.asarray(lower, float)
        self.upper = np.full(dim, b) if upper is None else np.asarray(upper, float)
        self.rng = np.random.default_rng(seed)
        self.population: np.ndarray | None = None
        self.fitness: np.ndarray | None = None
        self.generation = 0
        self.nfev = 0
        self._pending: np.ndarray | None = None

    # -- ask / tell ---------------------------------------------------------------------------
    def ask(self) -> np.ndarray:
        """The next batch to evaluate: the initial population first, then one trial per individual."""
        if self._pending is not None:
            return self._pending.copy()
        if self.population is None:
            self._pending = self._initial()
        else:
            self._pending = self._trials()
        return self._pending.copy()

    def tell(self, values) -> None:
        values = np.asarray(values, dtype=float).reshape(-1)
        if self._pending is None or len(values) != len(self._pending):
            raise ValueError("tell() needs one value per point of the last ask()")
        values = np.where(np.isfinite(values), values, np.inf)
        self.nfev += len(values)
        if self.population is None:
            self.population, self.fitness = self._pending, values
        else:
            better = values <= self.fitness
            self.population = np.where(better[:, None], self._pending, self.population)
            self.fitness = np.where(better, values, self.fitness)
            self.generation += 1
        self._pending = None

    @property
    def best(self) -> tuple[np.ndarray, float]:
        i = int(np.argmin(self.fitness))
        return self.population[i].copy(), float(self.fitness[i])

    # -- internals ----------------------------------------------------------------------------
    def _initial(self) -> np.ndarray:
        n, d = self.config.popsize, self.dim
        # Latin hypercube: one sample per stratum in every coordinate (as scipy's default init).
        strata = (self.rng.permuted(np.tile(np.arange(n), (d, 1)), axis=1).T + self.rng.random((n, d))) / n
        pop = self.lower + strata * (self.upper - self.lower)
        if self.config.include_origin:
            pop[0] = np.clip(np.zeros(d), self.lower, self.upper)
        return pop

    def _trials(self) -> np.ndarray:
        cfg, pop, n, d = self.config, self.population, self.config.popsize, self.dim
        f = cfg.mutation
        F = self.rng.uniform(f[0], f[1]) if isinstance(f, (tuple, list)) else float(f)
        best = pop[int(np.argmin(self.fitness))]
        trials = np.empty_like(pop)
        for i in range(n):
            others = [j for j in range(n) if j != i]
            r = self.rng.choice(others, size=NEEDS[cfg.strategy], replace=False)
            if cfg.strategy == "rand1bin":
                mutant = pop[r[0]] + F * (pop[r[1]] - pop[r[2]])
            elif cfg.strategy == "best1bin":
                mutant = best + F * (pop[r[0]] - pop[r[1]])
            elif cfg.strategy == "currenttobest1bin":
                mutant = pop[i] + F * (best - pop[i]) + F * (pop[r[0]] - pop[r[1]])
            else:  # rand2bin
                mutant = pop[r[0]] + F * (pop[r[1]] - pop[r[2]] + pop[r[3]] - pop[r[4]])
            cross = self.rng.random(d) < cfg.crossover
            cross[self.rng.integers(d)] = True
            trial = np.where(cross, mutant, pop[i])
            out = (trial < self.lower) | (trial > self.upper)
            if out.any():
                trial[out] = self.lower[out] + self.rng.random(int(out.sum())) * (self.upper - self.lower)[out]
            trials[i] = trial
        return trials

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        def arr(a):
            return None if a is None else a.tolist()

        return {
            "config": asdict(self.config), "dim": self.dim, "lower": arr(self.lower), "upper": arr(self.upper),
            "population": arr(self.population), "fitness": arr(self.fitness), "pending": arr(self._pending),
            "generation": self.generation, "nfev": self.nfev, "rng": self.rng.bit_generator.state,
        }

    @classmethod
    def from_state(cls, state: dict) -> "DEEngine":
        cfg = dict(state["config"])
        if isinstance(cfg.get("mutation"), list):
            cfg["mutation"] = tuple(cfg["mutation"])
        de = cls(state["dim"], DEConfig(**cfg), 0, np.array(state["lower"]), np.array(state["upper"]))
        de.rng.bit_generator.state = state["rng"]
        for key in ("population", "fitness"):
            if state[key] is not None:
                setattr(de, key, np.array(state[key], dtype=float))
        de._pending = None if state["pending"] is None else np.array(state["pending"], dtype=float)
        de.generation, de.nfev = state["generation"], state["nfev"]
        return de


def minimize_de(func: Callable[[np.ndarray], np.ndarray], dim: int, budget: int, config: DEConfig | None = None,
                seed: int = 0, lower=None, upper=None, callback: Callable | None = None) -> OptimizeResult:
    """Minimise a vectorised `func` ([P, d] -> [P]) within `budget` evaluations; scipy-style result."""
    de = DEEngine(dim, config, seed, lower, upper)
    history = []
    while de.nfev + len(de.ask()) <= budget:
        pts = de.ask()
        de.tell(func(pts))
        history.append({"nfev": de.nfev, "best": de.best[1], "mean": float(np.mean(de.fitness))})
        if callback is not None and callback(de):
            break
    x, fun = de.best
    return OptimizeResult(x=x, fun=fun, nfev=de.nfev, nit=de.generation, success=True,
                          message="evaluation budget used", population=de.population,
                          population_energies=de.fitness, history=history)


class DifferentialEvolution(Optimizer):
    """Differential Evolution behind the search protocol (`--optimizer de`): one generation (`popsize` points) per
    ask, run by a `DEEngine`."""

    name = "de"

    def __init__(self, dim: int, seed: int = 0, config: DEConfig | None = None):
        super().__init__(dim, seed)
        self.engine = DEEngine(dim, config, seed)

    def ask(self) -> np.ndarray:
        return self.engine.ask()

    def tell(self, X: np.ndarray, evaluation: Evaluation) -> None:
        self._check_tell(X, self.engine._pending, evaluation)
        self.engine.tell(evaluation.loss)
        self.nfev, self.generation = self.engine.nfev, self.engine.generation

    def state_dict(self) -> dict:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.engine = DEEngine.from_state(state)
        self.nfev, self.generation = self.engine.nfev, self.engine.generation
