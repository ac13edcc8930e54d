"""Subspace Gauss-Newton (`sgn`), on synthetic problems without a model: against scipy's least_squares, its
directions, its capability bound and its configuration checks."""

import json

import numpy as np
import pytest
from scipy.optimize import least_squares

from culturalign.alignment.config import AlignConfig
from culturalign.errors import CulturalignError
from culturalign.search import Evaluation, LoopState, SGNConfig, SubspaceGaussNewton, minimize

N, H = 4, 8  # soft tokens x hidden width
D = N * H


class Tanh:
    """Nonlinear least squares r(x) = A tanh(B x) - t with k > the subspace size and a nonzero optimum."""

    dim = D

    def __init__(self, k=40, seed=1, l1=False):
        rng = np.random.default_rng(seed)
        self.B = rng.standard_normal((20, D)) / np.sqrt(D)
        self.A = rng.standard_normal((k, 20))
        self.t = self.A @ np.tanh(self.B @ (0.5 * rng.standard_normal(D))) + 0.3 * rng.standard_normal(k)
        self.l1, self.calls = l1, 0

    def residuals(self, x):
        return self.A @ np.tanh(self.B @ x) - self.t

    def __call__(self, X, need_grad=False):
        self.calls += len(X)
        R = np.stack([self.residuals(x) for x in np.asarray(X)])
        loss = np.abs(R).sum(1) if self.l1 else 0.5 * (R**2).sum(1)
        return Evaluation(loss, R, np.ones(len(R)), np.abs(R).sum(1))


def gaussian(**kw):
    return SGNConfig(**{"directions": "gaussian", "max_norm": 0, "loss": "l2", **kw})


def test_reaches_scipy_least_squares_optimum():
    """Black-box, it must reach the cost of scipy's (Jacobian-using) trust-region least squares."""
    obj = Tanh()
    ref = least_squares(obj.residuals, np.zeros(D))
    res = minimize(obj, SubspaceGaussNewton(np.zeros(D), (N, H), 0, gaussian(), token_norm=1.0), 2000)
    assert ref.cost > 0.1  # a real nonzero optimum, not an exactly solvable system
    assert res.fun <= ref.cost * 1.001
    start = obj(np.zeros((1, D))).loss[0]
    assert res.history[20]["best_loss"] < start  # and it descends early, not by luck at the end


def test_l1_weights_descend_an_l1_objective():
    """IRLS weights (w_i = 1 / max(|r_i|, 1)) aim the steps at sum |r|, the survey's loss."""
    obj = Tanh(l1=True)
    res = minimize(obj, SubspaceGaussNewton(np.zeros(D), (N, H), 0, gaussian(loss="l1"), token_norm=1.0), 300)
    assert res.l1 < 0.5 * obj(np.zeros((1, D))).l1[0]


def test_vocab_probes_move_one_token_towards_a_real_token():
    rng = np.random.default_rng(0)
    vocab = rng.standard_normal((50, H))
    x0 = rng.standard_normal(D) * 0.1
    cfg = SGNConfig(probes=6, directions="vocab", probe_size=0.5, max_norm=0)
    opt = SubspaceGaussNewton(x0, (N, H), 3, cfg, vocab)
    X = opt.ask()
    opt.tell(X, Tanh()(X))
    P = opt.ask()
    p0 = x0.reshape(N, H)
    for p in P:
        moved = (p - opt.x).reshape(N, H)
        tokens = np.flatnonzero(np.linalg.norm(moved, axis=1) > 0)
        assert len(tokens) == 1
        t = tokens[0]
        assert np.linalg.norm(moved[t]) == pytest.approx(0.5 * opt.nu)  # half a real-token norm
        towards = vocab - p0[t]  # parallel to (real token - initial token) for one vocabulary row
        cos = towards @ moved[t] / (np.linalg.norm(towards, axis=1) * np.linalg.norm(moved[t]))
        assert cos.max() == pytest.approx(1.0)


def test_every_candidate_respects_the_norm_bound():
    rng = np.random.default_rng(0)
    vocab = rng.standard_normal((50, H))
    nu = np.median(np.linalg.norm(vocab, axis=1))
    x0 = rng.standard_normal(D) * 3.0  # starts far outside the bound
    opt = SubspaceGaussNewton(x0, (N, H), 0, SGNConfig(max_norm=1.5, radius=4.0), vocab)
    obj = Tanh(l1=True)
    for _ in range(12):
        X = opt.ask()
        assert np.linalg.norm(X.reshape(len(X), N, H), axis=-1).max() <= 1.5 * nu * (1 + 1e-12)
        opt.tell(X, obj(X))


def test_probes_concentrate_on_the_sensitive_token():
    """Only token 0 moves the residuals: after a few iterations it is probed most and rated most sensitive."""

    class OnlyToken0(Tanh):
        def residuals(self, x):
            z = np.zeros(D)
            z[:H] = x[:H]
            return super().residuals(z)

    opt = SubspaceGaussNewton(np.zeros(D), (N, H), 0, gaussian(probes=8, explore=0.1), token_norm=1.0)
    obj = OnlyToken0()
    minimize(obj, opt, 1 + 6 * 11)
    assert opt.sens[0] > 100 * opt.sens[1:].max()
    counts = np.zeros(N)
    for t, _, _ in opt._new_specs():
        counts[t] += 1
    assert counts[0] >= 5


def test_resume_mid_iteration_is_bit_identical():
    """A checkpoint after a probe batch (the step batch still to come) resumes to the same run."""
    rng = np.random.default_rng(0)
    vocab = rng.standard_normal((50, H))
    make = lambda: SubspaceGaussNewton(np.zeros(D), (N, H), 5, SGNConfig(probes=5, directions="mixed"), vocab)  # noqa: E731
    whole = minimize(Tanh(l1=True), make(), 80)
    saved = []
    minimize(Tanh(l1=True), make(), 40, checkpoint=lambda s: saved.append(json.loads(json.dumps(s.to_json()))))
    mid = next(s for s in reversed(saved) if s["optimizer"]["phase"] == "step")
    rest = minimize(Tanh(l1=True), make(), 80, state=LoopState.from_json(mid))
    drop = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert drop(rest.history) == drop(whole.history) and np.array_equal(rest.x, whole.x)
    with pytest.raises(ValueError, match="configuration"):
        SubspaceGaussNewton(np.zeros(D), (N, H), 5, SGNConfig(probes=6), vocab).load_state_dict(mid["optimizer"])


@pytest.mark.parametrize("field,value,match", [
    ("probes", 0, "--probes must be an integer >= 1"),
    ("window", 4, "--window must be an integer >= probes"),
    ("directions", "sideways", "--directions 'sideways'"),
    ("radius", -1.0, "--radius must be a positive finite number"),
    ("max_norm", float("nan"), "--max-norm must be >= 0"),
    ("probe_size", float("inf"), "--probe-size must be a positive finite number"),
])
def test_align_config_names_the_field_and_the_cli_its_flag(field, value, match):
    from culturalign.alignment.config import flag

    with pytest.raises(CulturalignError) as e:
        AlignConfig(optimizer="sgn", **{field: value})
    assert str(e.value).startswith(f"{field} ")  # the library names the field
    assert e.value.named(flag).startswith(match)  # the CLI shows its flag


def test_align_config_budget_must_cover_one_iteration():
    with pytest.raises(CulturalignError, match="too small for sgn"):
        AlignConfig(optimizer="sgn", budget=5)
    assert AlignConfig(optimizer="sgn", budget=12).batch_size == 8
