"""Subspace Gauss-Newton (`sgn`): black-box, reads every candidate's signed index residuals, full prompt.

The fixed random subspace of Black-Box Tuning is the limit of DE on this task (README, "Alignment"):
Adam through the same 16-d projection ends no better than DE, while Adam on the full prompt halves the
L1 several times over. `sgn` searches the full soft prompt [n, hidden] without gradients, in the spirit
of DFBGN (Cartis & Roberts 2021, random-subspace derivative-free Gauss-Newton; its package is GPL-3,
so this is our own implementation). Each iteration is two batches:

1. **Probe batch** (`probes` points). Directions U = [u_1 .. u_p], each moving one soft token:
   - *memory*: the last accepted displacements (the directions that worked, as in BSL / CMA's path);
   - *vocab*: from the token towards a real token embedding, u = e_v - x_t (v drawn from the most frequent
     vocabulary rows). The model is trained to read such directions, so they move the answers at the scale
     of real tokens, where random Gaussian directions barely do unless they are enormous;
   - *gaussian*: isotropic, with the norm of a real token (`directions="gaussian"`, or mixed in).
   The soft token of each direction is drawn in proportion to a running estimate of how strongly each
   token moves the answers (per-token sensitivity, mixed with uniform), so probes concentrate where the
   answers are sensitive. The probe points are x + h u_j; their residuals give a finite-difference
   Jacobian J [k, p] of the k index residuals.
2. **Step batch** (`steps` points). Damped least squares in that subspace,
   min_s ||W^1/2 (r + J s)||^2 + mu ||s||^2, for `steps` damping values, each step clipped to the trust
   radius (W = I by default; `loss="l1"` reweights w_i = 1/max(|r_i|, 1), one IRLS step towards sum |r|).

Every candidate (probes included) is projected so that each soft token's norm stays within `max_norm`
(a multiple of the median real-token norm): the capability bound. The best point of both batches is
accepted if it lowers the loss; the trust radius grows on success and shrinks on failure, and restarts
at its initial value instead of collapsing (the collapse is what stalls a plain trust region here).

State (incumbent, residuals, sensitivity, memory, the pending directions and the numpy generator) is
JSON-safe, so a run resumes bit-identically from any batch boundary.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from culturalign.errors import CulturalignError
from culturalign.search.protocol import Evaluation, Optimizer

DIRECTIONS = ("vocab", "gaussian", "mixed")


@dataclass
class SGNConfig:
    probes: int = 8  # directions (= probe evaluations) per iteration
    steps: int = 3  # Gauss-Newton step candidates per iteration (damping values)
    memory: int = 2  # accepted displacements kept as directions
    directions: str = "vocab"  # vocab | gaussian | mixed
    probe_size: float = 0.5  # h: vocab probes move a token this fraction of the way to the real token;
    #                          gaussian probes this many real-token norms
    radius: float = 2.0  # initial trust radius, in real-token norms (whole-prompt displacement per step)
    max_radius: float = 8.0
    min_radius: float = 0.05  # below it the radius restarts at `radius`
    max_norm: float = 1.5  # each soft token's norm <= max_norm x median real-token norm (0 = no bound)
    explore: float = 0.25  # share of uniform in the token sampling
    loss: str = "l2"  # l2 (plain Gauss-Newton) | l1 (IRLS weights 1/max(|r|, 1)); l2 measured better on
    #                   tests/test_sgn.py's synthetic L1 problem (8.1 vs 10.4 at 300 evaluations)

    def __post_init__(self):
        for name in ("probes", "steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise CulturalignError(f"sgn {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if not isinstance(self.memory, int) or not 0 <= self.memory < self.probes:
            raise CulturalignError(f"sgn memory must be an integer in [0, probes), got {self.memory!r}")
        if self.directions not in DIRECTIONS:
            raise CulturalignError(f"sgn directions {self.directions!r}: expected one of {', '.join(DIRECTIONS)}")
        if self.loss not in ("l1", "l2"):
            raise CulturalignError(f"sgn loss {self.loss!r}: expected l1 or l2")
        for name in ("probe_size", "radius", "max_radius", "min_radius"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v > 0):
                raise CulturalignError(f"sgn {name} must be a positive finite number, got {v!r}")
        if not self.min_radius < self.radius <= self.max_radius:
            raise CulturalignError(f"sgn radii must satisfy min_radius < radius <= max_radius, got "
                                   f"{self.min_radius}, {self.radius}, {self.max_radius}")
        if not (np.isfinite(self.max_norm) and self.max_norm >= 0):
            raise CulturalignError(f"sgn max_norm must be >= 0 (0 = no bound), got {self.max_norm!r}")
        if not 0 <= self.explore <= 1:
            raise CulturalignError(f"sgn explore must be in [0, 1], got {self.explore!r}")


class SubspaceGaussNewton(Optimizer):
    """Full-prompt black-box Gauss-Newton in fresh per-token subspaces (see the module docstring).

    `x0`: the initial prompt flattened [n * hidden]; `shape`: (n, hidden); `vocab`: [V, hidden] real token
    embeddings the vocab directions point to and whose median norm sets every scale (for tests, any
    matrix of the right width; None only with gaussian directions and then `token_norm` is required).
    """

    name = "sgn"

    def __init__(self, x0: np.ndarray, shape: tuple[int, int], seed: int = 0, config: SGNConfig | None = None,
                 vocab: np.ndarray | None = None, token_norm: float | None = None):
        x0 = np.asarray(x0, dtype=float).reshape(-1)
        super().__init__(x0.size, seed)
        self.cfg = config or SGNConfig()
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
        self.rng = np.random.default_rng(seed)
        self.x = self._project(x0)
        self.r: np.ndarray | None = None  # residuals at x
        self.f = np.inf  # loss at x
        self.radius = self.cfg.radius
        self.sens = np.ones(self.shape[0])  # per-token sensitivity estimate (starts flat)
        self.seen = np.zeros(self.shape[0], dtype=bool)  # tokens probed at least once
        self.mem: list[np.ndarray] = []
        self.phase = "start"  # start -> probe -> step -> probe ...
        self.U: np.ndarray | None = None  # [p, dim] directions of the probe batch just told
        self.J: np.ndarray | None = None  # [k, p]
        self.probe_eval: dict | None = None  # the probe batch's points' losses, for acceptance
        self._pending: np.ndarray | None = None
        self._pending_dirs: np.ndarray | None = None

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

    def _tokens(self, k: int) -> np.ndarray:
        p = self.sens / self.sens.sum()
        p = (1 - self.cfg.explore) * p + self.cfg.explore / len(p)
        return self.rng.choice(len(p), size=k, p=p)

    def _directions(self) -> np.ndarray:
        """[p, dim]: memory first, then per-token vocab / gaussian directions (scaled so a probe is x + h u)."""
        n, H = self.shape
        out = [m.copy() for m in self.mem[-self.cfg.memory:]] if self.cfg.memory else []
        fresh = self.cfg.probes - len(out)
        toks = self._tokens(fresh)
        kinds = self.rng.random(fresh) < 0.5 if self.cfg.directions == "mixed" else None
        X = self.x.reshape(n, H)
        for j, t in enumerate(toks):
            u = np.zeros((n, H))
            gauss = self.cfg.directions == "gaussian" or (kinds is not None and kinds[j])
            if gauss:
                g = self.rng.standard_normal(H)
                u[t] = g * (self.nu / np.linalg.norm(g))
            else:
                v = int(self.rng.integers(len(self.vocab)))
                u[t] = self.vocab[v] - X[t]
            out.append(u.reshape(-1))
        return np.stack(out)

    def _token_of(self, u: np.ndarray) -> int | None:
        nz = np.flatnonzero(np.linalg.norm(u.reshape(self.shape), axis=1) > 0)
        return int(nz[0]) if len(nz) == 1 else None

    # -- ask / tell ----------------------------------------------------------------------------------
    def ask(self) -> np.ndarray:
        if self._pending is not None:
            return self._pending.copy()
        if self.phase == "start":
            X = self.x[None].copy()
        elif self.phase == "probe":
            U = self._directions()
            self._pending_dirs = U
            X = self._probe_points(U)
        else:
            X = np.stack([self._project(self.x + s) for s in self._steps()])
        self._pending = X
        return X.copy()

    def _probe_points(self, U: np.ndarray) -> np.ndarray:
        return np.stack([self._project(self.x + self.cfg.probe_size * u) for u in U])

    def _steps(self) -> list[np.ndarray]:
        J, r, U = self.J, self.r, self.U
        w = 1.0 / np.maximum(np.abs(r), 1.0) if self.cfg.loss == "l1" else np.ones_like(r)
        A = J.T @ (w[:, None] * J)  # [p, p]
        b = J.T @ (w * r)
        scale = np.trace(A) / len(A) + 1e-12
        out = []
        for mu in np.logspace(-3, 0, self.cfg.steps) if self.cfg.steps > 1 else [1e-2]:
            s = -np.linalg.solve(A + mu * scale * np.eye(len(A)), b)
            step = s @ U
            norm = np.linalg.norm(step)
            cap = self.radius * self.nu
            if norm > cap:
                step = step * (cap / norm)
            out.append(step)
        return out

    def tell(self, X: np.ndarray, evaluation: Evaluation) -> None:
        self._check_tell(X, self._pending, evaluation)
        X = self._pending
        self._pending = None
        self.nfev += len(X)
        self.generation += 1
        loss = np.where(np.isfinite(evaluation.loss), evaluation.loss, np.inf)
        if self.phase == "start":
            self.x, self.f, self.r = X[0].copy(), float(loss[0]), evaluation.residuals[0].copy()
            self.phase = "probe"
            return
        if self.phase == "probe":
            U = self._pending_dirs
            self._pending_dirs = None
            h = self.cfg.probe_size
            D = X - self.x[None]  # the actual displacements (after the norm projection)
            dR = evaluation.residuals - self.r[None]  # [p, k]
            # Jacobian in units of the directions actually taken: the projection may have shortened a probe
            coef = np.array([np.dot(d, u) / max(np.dot(u, u), 1e-30) for d, u in zip(D, U)])
            coef = np.where(np.abs(coef) > 1e-12, coef, h)
            self.J = np.ascontiguousarray((dR / coef[:, None]).T)  # C order, as after a JSON round trip
            self.U = U
            for u, dr, c in zip(U, dR, coef):
                t = self._token_of(u)
                if t is not None:
                    g = np.linalg.norm(dr) / (abs(c) * np.linalg.norm(u) + 1e-30)
                    self.sens[t] = 0.7 * self.sens[t] + 0.3 * g if self.seen[t] else g
                    self.seen[t] = True
            if self.seen.any():  # unprobed tokens: assume the mean of the probed ones
                self.sens[~self.seen] = self.sens[self.seen].mean()
            self.probe_eval = {"loss": loss, "residuals": evaluation.residuals}
            self.phase = "step"
            return
        # step batch: accept the best of the steps and the probes
        P = self.probe_eval
        allX = np.concatenate([X, self._probe_points(self.U)])
        allL = np.concatenate([loss, P["loss"]])
        allR = np.concatenate([evaluation.residuals, P["residuals"]])
        i = int(np.argmin(allL))
        if allL[i] < self.f:
            moved = allX[i] - self.x
            self.x, self.f, self.r = allX[i].copy(), float(allL[i]), allR[i].copy()
            norm = np.linalg.norm(moved)
            if self.cfg.memory and norm > 0:
                self.mem = (self.mem + [moved * (self.nu / norm)])[-self.cfg.memory:]
            self.radius = min(self.radius * 1.5, self.cfg.max_radius) if i < len(X) else self.radius
        else:
            self.radius *= 0.5
            if self.radius < self.cfg.min_radius:
                self.radius = self.cfg.radius
        self.U = self.J = self.probe_eval = None
        self.phase = "probe"

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        arr = lambda a: None if a is None else np.asarray(a).tolist()  # noqa: E731
        pe = None if self.probe_eval is None else {k: arr(v) for k, v in self.probe_eval.items()}
        return {"name": self.name, "dim": self.dim, "seed": self.seed, "config": asdict(self.cfg),
                "nfev": self.nfev, "generation": self.generation, "phase": self.phase, "x": arr(self.x),
                "r": arr(self.r), "f": self.f if np.isfinite(self.f) else None, "radius": self.radius,
                "sens": arr(self.sens), "seen": arr(self.seen),
                "mem": [arr(m) for m in self.mem], "U": arr(self.U), "J": arr(self.J), "probe_eval": pe,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name or state.get("dim") != self.dim or state.get("config") != asdict(self.cfg):
            raise ValueError("sgn: the state is for another problem size or configuration")
        arr = lambda a: None if a is None else np.asarray(a, dtype=float)  # noqa: E731
        self.nfev, self.generation, self.phase = int(state["nfev"]), int(state["generation"]), state["phase"]
        self.x, self.r, self.radius = arr(state["x"]), arr(state["r"]), float(state["radius"])
        self.f = np.inf if state["f"] is None else float(state["f"])
        self.sens, self.mem = arr(state["sens"]), [arr(m) for m in state["mem"]]
        self.seen = np.asarray(state["seen"], dtype=bool)
        self.U, self.J = arr(state["U"]), arr(state["J"])
        pe = state["probe_eval"]
        self.probe_eval = None if pe is None else {k: arr(v) for k, v in pe.items()}
        self.rng.bit_generator.state = state["rng"]
        self._pending = self._pending_dirs = None
