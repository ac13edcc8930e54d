"""Subspace Gauss-Newton (`sgn`): black-box, reads every candidate's signed index residuals, full prompt.

The fixed random subspace of Black-Box Tuning is the limit of DE on this task (README, "Alignment"):
Adam through the same 16-d projection ends no better than DE, while Adam on the full prompt halves the
L1 several times over. `sgn` searches the full soft prompt [n, hidden] without gradients, in the spirit
of DFBGN (Cartis & Roberts 2021, random-subspace derivative-free Gauss-Newton; its package is GPL-3,
so this is our own implementation). It keeps a linear model r(x + U c) ~ r + J c of the k signed index
residuals over a window of directions U that grows as it probes, and each iteration is two batches:

1. **Probe batch** (`probes` points). Fresh directions, each moving one soft token by one real-token
   norm: a Gaussian direction whose per-coordinate std is the first layer's input gain (`gain`, the
   default: on SmolLM2-135M the 64 highest-gain of 576 coordinates hold 49% of the gradient's energy,
   against 11% for 64 random ones), an isotropic one (`gaussian`), or the direction from the initial
   prompt's token towards a real token embedding (`vocab`; `mixed` is half vocab, half gaussian). The token of each direction is drawn in
   proportion to a running estimate of how strongly each token moves the answers (mixed with uniform,
   `explore`), so the probes concentrate where the answers are sensitive: on SmolLM2-135M, 64% of the
   gradient's energy sits on soft token 0. The probe points x + h u_j give J's new columns by finite
   differences; the oldest columns beyond `window` are dropped (DFBGN's partial subspace retention).
2. **Step batch** (`steps` points). Damped least squares in the whole window,
   min_c ||W^1/2 (r + J c)||^2 + mu ||c||^2, for `steps` damping values, each step U c clipped to the
   trust radius (W = I by default; `loss="l1"` reweights w_i = 1/max(|r_i|, 1), one IRLS step towards
   sum |r|). Every evaluated step also corrects J by a Broyden (secant) update, so the columns measured
   at earlier points stay usable as the incumbent moves.

Every candidate (probes included) is projected so that each soft token's norm stays within `max_norm`
(a multiple of the median real-token norm): the capability bound. The best point of both batches is
accepted if it lowers the loss; the trust radius grows when a step wins and shrinks when nothing does,
and restarts at its initial value instead of collapsing (the collapse is what stalls a plain trust
region here). Directions are stored as (token, kind, seed or token id), so the state stays small,
JSON-safe, and a run resumes bit-identically from any batch boundary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from culturalign.errors import ConfigError, CulturalignError
from culturalign.errors import field as F
from culturalign.search.protocol import Evaluation, Optimizer

DIRECTIONS = ("gain", "gaussian", "vocab", "mixed")


@dataclass
class SGNConfig:
    probes: int = 8  # directions (= probe evaluations) per iteration
    steps: int = 3  # Gauss-Newton step candidates per iteration (damping values)
    window: int = 32  # directions kept in the model (the subspace); >= probes
    directions: str = "gain"  # gain | gaussian | vocab | mixed (vocab and gaussian, half each)
    probe_size: float = 0.5  # h: a probe moves one token this many real-token norms
    radius: float = 1.0  # initial trust radius, in real-token norms (whole-prompt displacement per step)
    max_radius: float = 8.0
    min_radius: float = 0.05  # below it the radius restarts at `radius`
    max_norm: float = 1.5  # each soft token's norm <= max_norm x median real-token norm (0 = no bound)
    explore: float = 0.25  # share of uniform in the token sampling
    loss: str = "l2"  # l2 (plain Gauss-Newton) | l1 (IRLS weights 1/max(|r|, 1)); l2 measured better on
    #                   tests/test_sgn.py's synthetic L1 problem (8.1 vs 10.4 at 300 evaluations)

    def __post_init__(self):
        for name in ("probes", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{F(name)} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.window, int) or self.window < self.probes:
            raise ConfigError(f"{F('window')} must be an integer >= probes ({self.probes}), got {self.window!r}")
        if self.directions not in DIRECTIONS:
            raise ConfigError(f"{F('directions')} {self.directions!r}: expected one of {', '.join(DIRECTIONS)}")
        if self.loss not in ("l1", "l2"):
            raise ConfigError(f"{F('loss')} {self.loss!r}: expected l1 or l2")
        for name in ("probe_size", "radius", "max_radius", "min_radius"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
                raise ConfigError(f"{F(name)} must be a positive finite number, got {v!r}")
        if not self.min_radius < self.radius <= self.max_radius:
            raise CulturalignError(f"sgn radii must satisfy min_radius < radius <= max_radius, got "
                                   f"{self.min_radius}, {self.radius}, {self.max_radius}")
        if not (np.isfinite(self.max_norm) and self.max_norm >= 0):
            raise ConfigError(f"{F('max_norm')} must be >= 0 (0 = no bound), got {self.max_norm!r}")
        if not 0 <= self.explore <= 1:
            raise ConfigError(f"{F('explore')} must be in [0, 1], got {self.explore!r}")


class SubspaceGaussNewton(Optimizer):
    """Full-prompt black-box Gauss-Newton over a window of per-token directions (see the module docstring).

    `x0`: the initial prompt flattened [n * hidden]; `shape`: (n, hidden); `vocab`: [V, hidden] real token
    embeddings, whose median norm sets every scale and which vocab directions point to (None: give
    `token_norm`, gaussian directions only); `gain`: [hidden] the first layer's per-coordinate input gain
    (`Backend.input_gain`), the per-coordinate std of gain directions (None: they fall back to gaussian).
    """

    name = "sgn"
    GAUSS, VOCAB, GAIN = 0, 1, 2

    def __init__(self, x0: np.ndarray, shape: tuple[int, int], seed: int = 0, config: SGNConfig | None = None,
                 vocab: np.ndarray | None = None, token_norm: float | None = None, gain: np.ndarray | None = None):
        x0 = np.asarray(x0, dtype=float).reshape(-1)
        super().__init__(x0.size, seed)
        self.cfg = config or SGNConfig()
        self.gain = None if gain is None else np.asarray(gain, dtype=float).reshape(-1)
        self.shape = (int(shape[0]), int(shape[1]))
        if self.shape[0] * self.shape[1] != self.dim:
            raise ValueError(f"sgn: shape {shape} does not match x0 of size {self.dim}")
        self.vocab = None if vocab is None else np.asarray(vocab, dtype=float)
        if self.vocab is None and self.cfg.directions != "gaussian":
            raise ValueError("sgn: vocab directions need the vocabulary embeddings")
        if token_norm is None:
            if self.vocab is None:
                raise ValueError("sgn: give token_norm or vocab")
            token_norm = float(np.median(np.linalg.norm(self.vocab, axis=1)))
        self.nu = float(token_norm)
        self.p0 = x0.reshape(self.shape).copy()
        self.rng = np.random.default_rng(seed)
        self.x = self._project(x0)
        self.r: np.ndarray | None = None  # residuals at x
        self.f = np.inf  # loss at x
        self.radius = self.cfg.radius
        self.sens = np.ones(self.shape[0])  # per-token sensitivity estimate (flat until probed)
        self.seen = np.zeros(self.shape[0], dtype=bool)
        self.specs: list[list[int]] = []  # the window's directions: [token, kind, seed or vocabulary row]
        self.J = np.zeros((0, 0))  # [k, len(specs)]
        self.phase = "start"  # start -> probe -> step -> probe ...
        self.fresh: list[list[int]] = []  # the probe batch's directions
        self.coefs: np.ndarray | None = None  # [steps, m] the step batch's coordinates
        self.probe_eval: dict | None = None
        self._pending: np.ndarray | None = None

    # -- geometry ----------------------------------------------------------------------------------
    def _project(self, x: np.ndarray) -> np.ndarray:
        """Scale each soft token down to norm <= max_norm * nu (the capability bound)."""
        if not self.cfg.max_norm:
            return x
        t = x.reshape(-1, *self.shape).copy()
        cap = self.cfg.max_norm * self.nu
        norms = np.linalg.norm(t, axis=-1, keepdims=True)
        t = np.where(norms > cap, t * (cap / np.maximum(norms, 1e-30)), t)
        return t.reshape(x.shape)

    def _u(self, spec) -> np.ndarray:
        """The direction of a spec, [dim], with the norm of a real token."""
        t, kind, a = spec
        if kind == self.VOCAB:
            v = self.vocab[a] - self.p0[t]
        else:
            v = np.random.default_rng(a).standard_normal(self.shape[1])
            if kind == self.GAIN and self.gain is not None:
                v = v * self.gain
        u = np.zeros(self.shape)
        u[t] = v * (self.nu / max(np.linalg.norm(v), 1e-30))
        return u.reshape(-1)

    def _U(self, specs) -> np.ndarray:
        return np.stack([self._u(s) for s in specs]) if specs else np.zeros((0, self.dim))

    def _new_specs(self) -> list[list[int]]:
        k = self.cfg.probes
        p = self.sens / self.sens.sum()
        p = (1 - self.cfg.explore) * p + self.cfg.explore / len(p)
        toks = self.rng.choice(len(p), size=k, p=p)
        kinds = {"gaussian": np.zeros(k, bool), "gain": np.zeros(k, bool), "vocab": np.ones(k, bool),
                 "mixed": self.rng.random(k) < 0.5}[self.cfg.directions]
        seeds = self.rng.integers(0, 2**31 - 1, size=k)
        rows = self.rng.integers(0, 1 if self.vocab is None else len(self.vocab), size=k)
        other = self.GAIN if self.cfg.directions == "gain" and self.gain is not None else self.GAUSS
        return [[int(t), self.VOCAB if v else other, int(r if v else s)]
                for t, v, s, r in zip(toks, kinds, seeds, rows)]

    def _probe_points(self, specs) -> np.ndarray:
        return np.stack([self._project(self.x + self.cfg.probe_size * u) for u in self._U(specs)])

    def _step_coefs(self, U: np.ndarray) -> np.ndarray:
        """[steps, m] damped (and trust-region clipped) Gauss-Newton coordinates in the window U [m, dim]."""
        J, r = self.J, self.r
        w = 1.0 / np.maximum(np.abs(r), 1.0) if self.cfg.loss == "l1" else np.ones_like(r)
        A = J.T @ (w[:, None] * J)
        b = J.T @ (w * r)
        scale = np.trace(A) / len(A) + 1e-12
        out = []
        for mu in (np.logspace(-3, 0, self.cfg.steps) if self.cfg.steps > 1 else [1e-2]):
            c = -np.linalg.solve(A + mu * scale * np.eye(len(A)), b)
            norm = np.linalg.norm(c @ U)
            cap = self.radius * self.nu
            out.append(c * (cap / norm) if norm > cap else c)
        return np.stack(out)

    # -- ask / tell ----------------------------------------------------------------------------------
    def ask(self) -> np.ndarray:
        if self._pending is not None:
            return self._pending.copy()
        if self.phase == "start":
            X = self.x[None].copy()
        elif self.phase == "probe":
            self.fresh = self._new_specs()
            X = self._probe_points(self.fresh)
        else:
            U = self._U(self.specs)
            self.coefs = self._step_coefs(U)
            X = np.stack([self._project(self.x + c @ U) for c in self.coefs])
        self._pending = X
        return X.copy()

    def tell(self, X: np.ndarray, evaluation: Evaluation) -> None:
        self._check_tell(X, self._pending, evaluation)
        X = self._pending
        self._pending = None
        self.nfev += len(X)
        self.generation += 1
        loss = np.where(np.isfinite(evaluation.loss), evaluation.loss, np.inf)
        R = evaluation.residuals
        if self.phase == "start":
            self.x, self.f, self.r = X[0].copy(), float(loss[0]), R[0].copy()
            self.J = np.zeros((len(self.r), 0))
            self.phase = "probe"
            return
        if self.phase == "probe":
            U = self._U(self.fresh)
            ok = np.isfinite(R).all(1)
            cols, keep = [], []
            for j, (x, u) in enumerate(zip(X, U)):
                h = float(np.dot(x - self.x, u) / np.dot(u, u))  # the length taken (the bound may shorten it)
                if not ok[j] or abs(h) < 1e-9:
                    continue
                col = (R[j] - self.r) / h
                t = self.fresh[j][0]
                g = np.linalg.norm(col) / self.nu
                self.sens[t] = 0.7 * self.sens[t] + 0.3 * g if self.seen[t] else g
                self.seen[t] = True
                cols.append(col)
                keep.append(self.fresh[j])
            if self.seen.any():  # tokens never probed: assume the mean of the probed ones
                self.sens[~self.seen] = self.sens[self.seen].mean()
            if cols:
                self.J = np.ascontiguousarray(np.concatenate([self.J, np.stack(cols, 1)], 1)[:, -self.cfg.window:])
                self.specs = (self.specs + keep)[-self.cfg.window:]
            self.probe_eval = {"loss": loss, "residuals": R}
            self.phase = "step" if self.specs else "probe"
            return
        # step batch: secant-correct the model with every step, then accept the best of the steps and probes
        for c, x_new, r_new in zip(self.coefs, X, R):
            if np.isfinite(r_new).all() and np.dot(c, c) > 0:
                self.J = self.J + np.outer(r_new - self.r - self.J @ c, c) / np.dot(c, c)
        probes = self._probe_points(self.fresh)
        P = self.probe_eval
        allX, allL = np.concatenate([X, probes]), np.concatenate([loss, P["loss"]])
        allR = np.concatenate([R, P["residuals"]])
        i = int(np.argmin(allL))
        if allL[i] < self.f:
            self.x, self.f, self.r = allX[i].copy(), float(allL[i]), allR[i].copy()
            self.radius = min(self.radius * 1.5, self.cfg.max_radius) if i < len(X) else self.radius
        else:
            self.radius *= 0.5
            if self.radius < self.cfg.min_radius:
                self.radius = self.cfg.radius
        self.fresh, self.coefs, self.probe_eval = [], None, None
        self.phase = "probe"

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        arr = lambda a: None if a is None else np.asarray(a).tolist()  # noqa: E731
        pe = None if self.probe_eval is None else {k: arr(v) for k, v in self.probe_eval.items()}
        return {"name": self.name, "dim": self.dim, "seed": self.seed, "config": asdict(self.cfg),
                "nfev": self.nfev, "generation": self.generation, "phase": self.phase, "x": arr(self.x),
                "r": arr(self.r), "f": self.f if np.isfinite(self.f) else None, "radius": self.radius,
                "sens": arr(self.sens), "seen": arr(self.seen), "specs": self.specs, "J": arr(self.J),
                "fresh": self.fresh, "probe_eval": pe, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name or state.get("dim") != self.dim or state.get("config") != asdict(self.cfg):
            raise ValueError("sgn: the state is for another problem size or configuration")
        arr = lambda a: None if a is None else np.asarray(a, dtype=float)  # noqa: E731
        self.nfev, self.generation, self.phase = int(state["nfev"]), int(state["generation"]), state["phase"]
        self.x, self.r, self.radius = arr(state["x"]), arr(state["r"]), float(state["radius"])
        self.f = np.inf if state["f"] is None else float(state["f"])
        self.sens, self.seen = arr(state["sens"]), np.asarray(state["seen"], dtype=bool)
        self.specs, self.fresh = [list(s) for s in state["specs"]], [list(s) for s in state["fresh"]]
        self.J = np.ascontiguousarray(np.asarray(state["J"], dtype=float).reshape(len(self.r), -1))
        pe = state["probe_eval"]
        self.probe_eval = None if pe is None else {k: arr(v) for k, v in pe.items()}
        self.rng.bit_generator.state = state["rng"]
        self._pending, self.coefs = None, None
