"""`AlignConfig`: every setting of an alignment run, validated, and the single source of defaults.

Light on purpose (no torch, no search engines at import): the command line reads its defaults from
here when it starts, and the experiment files are checked against it before any model loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from culturalign.errors import CulturalignError

OPTIMIZERS = ("de", "sgn", "cmaes", "dfols", "random", "adam", "adam-subspace")
POPULATION = ("de", "cmaes", "random")  # methods that evaluate --popsize candidates per batch
INITS = ("text", "vocab", "random")
# fields added after runs were first recorded: left out of fingerprints at their defaults (AlignConfig.fingerprint_json)
LATER_FIELDS = ("order", "probes", "sgn_steps", "window", "directions", "probe_size", "radius", "max_norm", "capability",
                "capability_weight", "contrast")
# option-mass penalty (floor, weight) per method when not given. sgn's steps along the high-gain coordinates
# trade option mass for L1 (measured: 0.98 -> 0.34 for 58 points of L1 under 0.5/100), so its penalty is steep.
MASS_DEFAULTS = {"sgn": (0.8, 1000.0)}
MASS_DEFAULT = (0.5, 100.0)
# the capability bound (max perplexity ratio of the anchor text) per method when not given; 0 = none. DE, the
# paper's method, runs as the paper did; sgn's gain directions cost capability fast (held-out perplexity x7.8
# within 56 evaluations without the bound).
CAPABILITY_DEFAULTS = {"sgn": 1.5}
DFOLS_EXTRA = "pip install 'culturalign[dfols]'"


def dfols_missing() -> str | None:
    """Why `--optimizer dfols` cannot run here (DFO-LS, GPL-3.0-or-later, is an optional extra), or None."""
    import importlib.util

    try:
        found = importlib.util.find_spec("dfols") is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return (f"--optimizer dfols needs the DFO-LS package, which is not installed; it is an optional extra "
            f"(GPL-3.0-or-later): {DFOLS_EXTRA}")
ORDERS = ("forward", "reversed", "both")  # option order of the items (culturalign.survey.ORDERS)


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
    mass_floor: float | None = None  # None: the method's default (MASS_DEFAULTS)
    mass_weight: float | None = None
    constants: dict[str, float] = field(default_factory=dict)
    order: str = "forward"  # options as presented, reversed, or both orders averaged (see culturalign.survey)

    def __post_init__(self):
        floor, weight = MASS_DEFAULTS.get(self.optimizer, MASS_DEFAULT)
        if self.mass_floor is None:
            self.mass_floor = floor
        if self.mass_weight is None:
            self.mass_weight = weight
        if self.capability is None:
            self.capability = CAPABILITY_DEFAULTS.get(self.optimizer, 0.0)

    def validate(self) -> "AlignConfig":
        """Check every field before any work starts; errors name the command-line flag."""
        if self.optimizer not in OPTIMIZERS:
            raise CulturalignError(f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "dfols" and dfols_missing():
            raise CulturalignError(dfols_missing())
        if self.init not in INITS:
            raise CulturalignError(f"--init {self.init!r}: expected one of {', '.join(INITS)}")
        if self.order not in ORDERS:
            raise CulturalignError(f"--order {self.order!r}: expected one of {', '.join(ORDERS)}")
        for flag, value in (("--budget", self.budget), ("--tokens", self.tokens), ("--dim", self.dim)):
            if value < 1:
                raise CulturalignError(f"{flag} must be at least 1, got {value}")
        for flag, value in (("--seed", self.seed), ("--projection-seed", self.projection_seed)):
            if value is not None and not 0 <= value < 2**32:
                raise CulturalignError(f"{flag} must be between 0 and 2^32 - 1, got {value}")
        _finite("--sigma", self.sigma, low=0.0, low_open=True)
        _finite("--lr", self.lr, low=0.0, low_open=True)
        _finite("--cma-sigma0", self.cma_sigma0, low=0.0, low_open=True)
        _finite("--dfols-rhobeg", self.dfols_rhobeg, low=0.0, low_open=True, high=2.0)
        _finite("--bound", self.bound, low=0.0, low_open=True)
        _finite("--mass-floor", self.mass_floor, low=0.0, high=1.0)
        _finite("--capability-weight", self.capability_weight, low=0.0)
        _finite("--contrast", self.contrast, low=0.0, high=1.0)
        if not (isinstance(self.capability, (int, float)) and math.isfinite(self.capability)
                and (self.capability == 0 or self.capability > 1)):
            raise CulturalignError(f"--capability must be 0 (off) or a perplexity ratio > 1, got {self.capability}")
        _finite("--mass-weight", self.mass_weight, low=0.0)
        if self.optimizer == "de":
            self.de_config()
            if self.budget < 2 * self.popsize:
                raise CulturalignError(
                    f"--budget {self.budget} is too small for a population of {self.popsize}: "
                    f"need at least {2 * self.popsize} evaluations (initial population + one generation)"
                )
        elif self.optimizer in POPULATION:
            if self.popsize < 2:
                raise CulturalignError(f"--popsize must be at least 2 for {self.optimizer}, got {self.popsize}")
            if self.budget < self.popsize:
                raise CulturalignError(f"--budget {self.budget} is smaller than one batch of --popsize {self.popsize}")
        elif self.optimizer == "sgn":
            self.sgn_config()
            if self.budget < 1 + self.probes + self.sgn_steps:
                raise CulturalignError(
                    f"--budget {self.budget} is too small for sgn: one iteration needs {1 + self.probes + self.sgn_steps} "
                    f"evaluations (the start, {self.probes} probes, {self.sgn_steps} steps)"
                )
        elif self.optimizer == "dfols" and self.budget < self.dim + 2:
            raise CulturalignError(
                f"--budget {self.budget} is too small for dfols in {self.dim} dimensions: it needs {self.dim + 1} "
                f"evaluations for its first model and one step, at least {self.dim + 2}"
            )
        if self.init_text is not None and not self.init_text.strip():
            raise CulturalignError("--init-text is empty; give a sentence, or leave it out for the persona sentence")
        return self

    def de_config(self):
        from culturalign.search.de import DEConfig

        return DEConfig(self.popsize, self.mutation, self.crossover, self.strategy, self.bound).validate()

    def sgn_config(self):
        from culturalign.search.sgn import SGNConfig

        try:
            return SGNConfig(probes=self.probes, steps=self.sgn_steps, window=self.window, directions=self.directions,
                             probe_size=self.probe_size, radius=self.radius, max_radius=max(8.0, self.radius),
                             max_norm=self.max_norm)
        except CulturalignError as e:
            flag = {"probes": "--probes", "steps": "--sgn-steps", "window": "--window", "directions": "--directions",
                    "probe_size": "--probe-size", "radius": "--radius", "max_norm": "--max-norm"}
            msg = str(e)
            for field_, f in flag.items():
                msg = msg.replace(f"sgn {field_} ", f"{f} ", 1)
            raise CulturalignError(msg) from None

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
        if self.optimizer == "sgn":
            return self.probes
        return self.popsize if self.optimizer in POPULATION else 1

    @property
    def uses_projection(self) -> bool:
        return self.optimizer not in ("adam", "sgn")

    def make_optimizer(self, dim: int, x0=None, shape=None, vocab=None, gain=None):
        """The configured method over `dim` coordinates (`x0`: the flattened initial prompt, for the full-prompt
        methods; `shape` (n, hidden), `vocab` [V, hidden] real token embeddings and `gain` [hidden]: sgn's directions)."""
        from culturalign.search import CMAES, DE, DFOLS, Adam, RandomSearch

        o = self.optimizer
        if o == "sgn":
            from culturalign.search.sgn import SubspaceGaussNewton

            return SubspaceGaussNewton(x0, shape, self.seed, self.sgn_config(), vocab, gain=gain)
        if o == "de":
            return DE(dim, self.seed, self.de_config())
        if o == "cmaes":
            return CMAES(dim, self.seed, self.popsize, self.bound, self.cma_sigma0)
        if o == "dfols":
            return DFOLS(dim, self.seed, self.bound, self.dfols_rhobeg)
        if o == "random":
            return RandomSearch(dim, self.seed, self.popsize, self.bound)
        return Adam(dim, self.seed, self.lr, x0)

    @property
    def proj_seed(self) -> int:
        return self.seed if self.projection_seed is None else self.projection_seed


def _finite(flag: str, value: float, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    """A finite number within [low, high] (or (low, high] when `low_open`), or one error naming the flag."""
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
        raise CulturalignError(f"{flag} must be {want}, got {value}")


