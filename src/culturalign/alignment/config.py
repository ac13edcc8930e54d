"""`AlignConfig`: every setting of an alignment run, checked on construction, and the single source of defaults.

Light on purpose (no torch, no search engines at import): the command line reads its defaults from
here when it starts, and the experiment files are checked against it before any model loads. What
differs per method (its defaults, budget rules, batch size and engine) is read from the optimizer
registry (`culturalign.search.registry`). Errors are `ConfigError`s naming the field; the CLI shows
them with its flag for the field (`flag`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from culturalign.errors import ConfigError
from culturalign.errors import field as F
from culturalign.measure.instrument import ORDERS  # forward, reversed, both (culturalign.measure.survey)
from culturalign.search.registry import get_optimizer, optimizer_names
from culturalign.softprompt import INITS

# fields added after runs were first recorded: left out of fingerprints at their defaults (AlignConfig.fingerprint_json)
LATER_FIELDS = ("order", "probes", "sgn_steps", "window", "directions", "probe_size", "radius", "max_norm", "capability",
                "capability_weight", "contrast")


def flag(name: str) -> str:
    """The command-line flag of an AlignConfig field (`sgn_steps` -> `--sgn-steps`): how the CLI names a field."""
    return "--" + name.replace("_", "-")


@dataclass
class AlignConfig:
    optimizer: str = "sgn"  # the best black-box method under the capability bound (README, "Alignment that holds")
    budget: int = 160  # candidate evaluations (full surveys)
    tokens: int = 32  # soft prompt length n
    dim: int = 16  # DE search dimension d (z), n*hidden for no projection
    seed: int = 0
    projection_seed: int | None = None  # default: seed
    init: str = "text"
    init_text: str | None = None  # default: the persona sentence for the target
    prompt: str = "naive"  # profile the soft prompt is prepended to
    popsize: int = 6
    mutation: float | tuple[float, float] = (0.5, 1.0)
    crossover: float = 0.9
    strategy: str = "best1bin"
    bound: float = 1.0
    sigma: float = 40.0  # std of A z per coordinate, in embedding stds (see README, measured choice)
    lr: float = 0.02  # adam, adam-subspace
    cma_sigma0: float = 0.3  # cmaes: initial step, as a fraction of the bound
    dfols_rhobeg: float = 0.3  # dfols: initial trust-region radius, as a fraction of the bound
    probes: int = 8  # sgn: directions probed per iteration (then `sgn_steps` step candidates)
    sgn_steps: int = 3  # sgn: Gauss-Newton step candidates per iteration
    window: int = 32  # sgn: directions kept in its model (the subspace it steps in)
    directions: str = "gain"  # sgn: gain (Gaussian scaled by the first layer's input gain) | gaussian | vocab | mixed
    probe_size: float = 0.5  # sgn: a probe moves one soft token this many real-token norms
    radius: float = 1.0  # sgn: initial trust radius, in real-token norms
    max_norm: float = 1.5  # sgn: each soft token's norm <= max_norm x the median real-token norm (0 = no bound)
    capability: float | None = None  # max perplexity ratio of the anchor text (0 = no penalty); None: method default
    capability_weight: float = 100.0  # penalty per nat/token of anchor NLL past log(capability)
    contrast: float = 0.0  # weight of minus the mean L1 to the target set's other cultures (0 = off, paper A)
    mass_floor: float | None = None  # None: the method's default (its registry entry's `mass`)
    mass_weight: float | None = None
    constants: dict[str, float] = field(default_factory=dict)
    order: str = "forward"  # options as presented, reversed, or both orders averaged (see culturalign.measure.survey)

    def __post_init__(self):
        """Fill in the method's defaults, then check every field before any work starts; errors name the field."""
        if self.optimizer not in optimizer_names():
            raise ConfigError(f"{F('optimizer')} {self.optimizer!r}: expected one of {', '.join(optimizer_names())}")
        method = get_optimizer(self.optimizer)
        floor, weight = method.mass
        if self.mass_floor is None:
            self.mass_floor = floor
        if self.mass_weight is None:
            self.mass_weight = weight
        if self.capability is None:
            self.capability = method.capability
        missing = method.missing(F("optimizer"))
        if missing:
            raise ConfigError(missing)
        if self.init not in INITS:
            raise ConfigError(f"{F('init')} {self.init!r}: expected one of {', '.join(INITS)}")
        if self.order not in ORDERS:
            raise ConfigError(f"{F('order')} {self.order!r}: expected one of {', '.join(ORDERS)}")
        for name in ("budget", "tokens", "dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{F(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("seed", "projection_seed"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**32:
                raise ConfigError(f"{F(name)} must be between 0 and 2^32 - 1, got {value}")
        _finite("sigma", self.sigma, low=0.0, low_open=True)
        _finite("lr", self.lr, low=0.0, low_open=True)
        _finite("cma_sigma0", self.cma_sigma0, low=0.0, low_open=True)
        _finite("dfols_rhobeg", self.dfols_rhobeg, low=0.0, low_open=True, high=2.0)
        _finite("bound", self.bound, low=0.0, low_open=True)
        _finite("mass_floor", self.mass_floor, low=0.0, high=1.0)
        _finite("capability_weight", self.capability_weight, low=0.0)
        _finite("contrast", self.contrast, low=0.0, high=1.0)
        if not (isinstance(self.capability, (int, float)) and math.isfinite(self.capability)
                and (self.capability == 0 or self.capability > 1)):
            raise ConfigError(f"{F('capability')} must be 0 (off) or a perplexity ratio > 1, got {self.capability}")
        _finite("mass_weight", self.mass_weight, low=0.0)
        method.make_config(self)  # the method's own settings (DEConfig, SGNConfig) check theirs
        if method.check is not None:
            method.check(self)
        if self.init_text is not None and not self.init_text.strip():
            raise ConfigError(f"{F('init_text')} is empty; give a sentence, or leave it out for the persona sentence")

    @property
    def method(self):
        """The optimizer's registry entry (`culturalign.search.registry.OptimizerEntry`)."""
        return get_optimizer(self.optimizer)

    def method_config(self):
        """The method's settings dataclass (`DEConfig` for de, `SGNConfig` for sgn), or None."""
        return self.method.make_config(self)

    def fingerprint_json(self) -> dict:
        """The settings as JSON for the records that a later run is compared with (a checkpoint's
        fingerprint, an experiment's cells). Fields added later (`order`, the sgn settings) are left out at
        their defaults, so runs and experiments recorded before them still match."""
        import json
        from dataclasses import asdict

        config = json.loads(json.dumps(asdict(self)))
        default = AlignConfig(optimizer=self.optimizer)  # the method's own defaults (mass, capability)
        for name in LATER_FIELDS:
            if name in config and getattr(self, name) == getattr(default, name):
                config.pop(name)
        return config

    @property
    def batch_size(self) -> int:
        """Evaluations per batch: the budget is spent in whole batches (sgn alternates probes and steps)."""
        return self.method.batch_size(self)

    @property
    def uses_projection(self) -> bool:
        return not self.method.full_prompt

    def make_optimizer(self, dim: int, x0=None, shape=None, vocab=None, gain=None):
        """The configured method over `dim` coordinates (`x0`: the flattened initial prompt, for the full-prompt
        methods; `shape` (n, hidden), `vocab` [V, hidden] real token embeddings and `gain` [hidden]: sgn's directions)."""
        return self.method.make(self, dim, x0, shape, vocab, gain)

    @property
    def proj_seed(self) -> int:
        return self.seed if self.projection_seed is None else self.projection_seed


def _finite(name: str, value: float, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    """A finite number within [low, high] (or (low, high] when `low_open`), or one error naming the field."""
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        if low is not None and high is not None:
            want = f"a number in [{low:g}, {high:g}]"
        elif low is not None:
            want = f"a finite number {'>' if low_open else '>='} {low:g}"
        else:
            want = "a finite number"
        raise ConfigError(f"{F(name)} must be {want}, got {value}")


