"""The optimizer registry: every fact about each search method, in one table.

One `OptimizerEntry` per `--optimizer` name: its engine (a dotted path, imported on first use), whether it
evaluates a population per batch, whether it needs gradients, how it resumes (`native`: it exports its
state; `replay`: the loop replays the recorded evaluations into a fresh engine), what it searches (z in
the projection's box, or the full prompt), its settings dataclass, its defaults for the option-mass
penalty and the capability bound, its budget rules, and the optional package it needs. `AlignConfig`
reads all of these from here; a new method is one `register_optimizer(...)` call (as PEFT's
`register_peft_method`).

Light on purpose (no numpy, torch or engine at import): the command line reads this table at start-up.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from culturalign.errors import ConfigError
from culturalign.errors import field as F

MASS_DEFAULT = (0.5, 100.0)  # option-mass penalty (floor, weight) of a method that sets none
RESUMES = ("native", "replay")


@dataclass(frozen=True)
class Extra:
    """An optional package a method needs: not a dependency of culturalign (e.g. for its licence)."""

    module: str  # its import name
    package: str  # its name as people know it
    licence: str
    pip: str  # culturalign's extra that installs it


@dataclass(frozen=True)
class OptimizerEntry:
    """One search method. `settings` below is an `AlignConfig` (any object with its fields)."""

    name: str
    engine: str  # "module:Class": the `search.Optimizer` subclass, imported on first use
    population: bool = False  # evaluates a batch of `popsize` candidates per ask
    gradient: bool = False  # needs the objective's gradient
    resume: str = "native"  # native (state_dict) | replay (ReplayOptimizer)
    full_prompt: bool = False  # searches the flattened prompt (x0) instead of z in the projection's box
    directions: bool = False  # needs the real-token embeddings and the first layer's input gain (sgn)
    config: str | None = None  # "module:Class" of its settings dataclass, built from the run's settings
    config_fields: dict[str, str] = field(default_factory=dict)  # that dataclass's field -> AlignConfig field
    mass: tuple[float, float] = MASS_DEFAULT  # option-mass penalty (floor, weight) when the run gives none
    capability: float = 0.0  # capability bound (max perplexity ratio) when the run gives none; 0 = none
    config_derived: Callable[[Any], dict] | None = None  # settings-dataclass fields computed from the run's settings
    extra: Extra | None = None  # an optional package it needs; `missing()` says how to install it
    build: Callable[..., Any] | None = None  # (entry, settings, dim, x0, shape, vocab, gain) -> Optimizer
    check: Callable[[Any], None] | None = None  # its budget rules: raise ConfigError
    batch: Callable[[Any], int] | None = None  # evaluations per batch; default popsize (population) or 1

    def __post_init__(self):
        if self.resume not in RESUMES:
            raise ValueError(f"optimizer {self.name!r}: resume must be one of {', '.join(RESUMES)}, got {self.resume!r}")

    def engine_class(self) -> type:
        return _load(self.engine)

    def config_class(self) -> type | None:
        return None if self.config is None else _load(self.config)

    def make_config(self, settings):
        """The method's settings dataclass from the run's settings; its errors name the run's fields."""
        if self.config is None:
            return None
        cls = self.config_class()
        kwargs = {f: getattr(settings, s) for f, s in self.config_fields.items()}
        if self.config_derived is not None:
            kwargs.update(self.config_derived(settings))
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise e.renamed(self.config_fields) from None

    def batch_size(self, settings) -> int:
        if self.batch is not None:
            return self.batch(settings)
        return settings.popsize if self.population else 1

    def missing(self, flag: str = "--optimizer") -> str | None:
        """Why this method cannot run here (its optional package is not installed), or None."""
        x = self.extra
        if x is None or _found(x.module):
            return None
        return (f"{flag} {self.name} needs the {x.package} package, which is not installed; it is an optional extra "
                f"({x.licence}): pip install 'culturalign[{x.pip}]'")

    def make(self, settings, dim: int, x0=None, shape=None, vocab=None, gain=None):
        """The engine over `dim` coordinates (`x0`: the flattened initial prompt, for the full-prompt methods;
        `shape` (n, hidden), `vocab` [V, hidden] real token embeddings and `gain` [hidden]: sgn's directions)."""
        if self.build is not None:
            return self.build(self, settings, dim, x0, shape, vocab, gain)
        return self.engine_class()(dim, settings.seed)


OPTIMIZERS_TABLE: dict[str, OptimizerEntry] = {}


def register_optimizer(entry: OptimizerEntry, replace: bool = False) -> OptimizerEntry:
    """Add a search method to the table (a name given twice is an error unless `replace`)."""
    if entry.name in OPTIMIZERS_TABLE and not replace:
        raise ValueError(f"optimizer {entry.name!r} is already registered")
    OPTIMIZERS_TABLE[entry.name] = entry
    return entry


def get_optimizer(name: str) -> OptimizerEntry:
    try:
        return OPTIMIZERS_TABLE[name]
    except KeyError:
        raise ConfigError(f"{F('optimizer')} {name!r}: expected one of {', '.join(OPTIMIZERS_TABLE)}") from None


def optimizer_names() -> tuple[str, ...]:
    return tuple(OPTIMIZERS_TABLE)


def population_names() -> tuple[str, ...]:
    return tuple(n for n, e in OPTIMIZERS_TABLE.items() if e.population)


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _found(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def dfols_missing(flag: str = "--optimizer") -> str | None:
    """Why `--optimizer dfols` cannot run here (DFO-LS, GPL-3.0-or-later, is an optional extra), or None."""
    return OPTIMIZERS_TABLE["dfols"].missing(flag)


# ---- the methods: builders and budget rules ----------------------------------------------------------------

def _build_de(entry, s, dim, x0, shape, vocab, gain):
    return entry.engine_class()(dim, s.seed, entry.make_config(s))


def _check_de(s) -> None:
    if s.budget < 2 * s.popsize:
        raise ConfigError(
            f"{F('budget')} {s.budget} is too small for a population of {s.popsize}: "
            f"need at least {2 * s.popsize} evaluations (initial population + one generation)"
        )


def _check_population(s) -> None:
    if s.popsize < 2:
        raise ConfigError(f"{F('popsize')} must be at least 2 for {s.optimizer}, got {s.popsize}")
    if s.budget < s.popsize:
        raise ConfigError(f"{F('budget')} {s.budget} is smaller than one batch of {F('popsize')} {s.popsize}")


def _build_sgn(entry, s, dim, x0, shape, vocab, gain):
    return entry.engine_class()(x0, shape, s.seed, entry.make_config(s), vocab, gain=gain)


def _check_sgn(s) -> None:
    if s.budget < 1 + s.probes + s.sgn_steps:
        raise ConfigError(
            f"{F('budget')} {s.budget} is too small for sgn: one iteration needs {1 + s.probes + s.sgn_steps} "
            f"evaluations (the start, {s.probes} probes, {s.sgn_steps} steps)"
        )


def _build_cmaes(entry, s, dim, x0, shape, vocab, gain):
    return entry.engine_class()(dim, s.seed, s.popsize, s.bound, s.cma_sigma0)


def _build_dfols(entry, s, dim, x0, shape, vocab, gain):
    return entry.engine_class()(dim, s.seed, s.bound, s.dfols_rhobeg)


def _check_dfols(s) -> None:
    if s.budget < s.dim + 2:
        raise ConfigError(
            f"{F('budget')} {s.budget} is too small for dfols in {s.dim} dimensions: it needs {s.dim + 1} "
            f"evaluations for its first model and one step, at least {s.dim + 2}"
        )


def _build_random(entry, s, dim, x0, shape, vocab, gain):
    return entry.engine_class()(dim, s.seed, s.popsize, s.bound)


def _build_adam(entry, s, dim, x0, shape, vocab, gain):
    return entry.engine_class()(dim, s.seed, s.lr, x0)


# In --optimizer's order. mass / capability: sgn's steps along the high-gain coordinates trade option mass for
# L1 (measured: 0.98 -> 0.34 for 58 points of L1 under 0.5/100), so its penalty is steep; its gain directions
# cost capability fast (held-out perplexity x7.8 within 56 evaluations without the bound), so it runs with a
# capability bound. DE, the paper's method, runs as the paper did.
register_optimizer(OptimizerEntry(
    "de", "culturalign.search.de:DifferentialEvolution", population=True, config="culturalign.search.de:DEConfig",
    config_fields={"popsize": "popsize", "mutation": "mutation", "crossover": "crossover", "strategy": "strategy",
                   "bound": "bound"},
    build=_build_de, check=_check_de))
register_optimizer(OptimizerEntry(
    "sgn", "culturalign.search.sgn:SubspaceGaussNewton", full_prompt=True, directions=True,
    config="culturalign.search.sgn:SGNConfig",
    config_fields={"probes": "probes", "steps": "sgn_steps", "window": "window", "directions": "directions",
                   "probe_size": "probe_size", "radius": "radius", "max_norm": "max_norm"},
    config_derived=lambda s: {"max_radius": max(8.0, s.radius)},
    mass=(0.8, 1000.0), capability=1.5, build=_build_sgn, check=_check_sgn,
    batch=lambda s: s.probes))  # sgn alternates probes and steps; the budget is counted in probe batches
register_optimizer(OptimizerEntry(
    "cmaes", "culturalign.search.cmaes:CMAES", population=True, resume="replay", build=_build_cmaes,
    check=_check_population))
register_optimizer(OptimizerEntry(
    "dfols", "culturalign.search.dfols:DFOLS", resume="replay", extra=Extra("dfols", "DFO-LS", "GPL-3.0-or-later", "dfols"), build=_build_dfols, check=_check_dfols))
register_optimizer(OptimizerEntry(
    "random", "culturalign.search.random:RandomSearch", population=True, build=_build_random, check=_check_population))
register_optimizer(OptimizerEntry(
    "adam", "culturalign.search.adam:Adam", gradient=True, full_prompt=True, build=_build_adam))
register_optimizer(OptimizerEntry(
    "adam-subspace", "culturalign.search.adam:Adam", gradient=True, build=_build_adam))
