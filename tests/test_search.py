"""The search protocol and the one loop, tested without a model on a fake objective (DESIGN: tests)."""

import json

import numpy as np
import pytest
from conftest import needs_dfols

from culturalign.errors import CulturalignError
from culturalign.search import (CMAES, DFOLS, Adam, DEConfig, DifferentialEvolution, Evaluation, LoopState, RandomSearch,
                                SGNConfig, SubspaceGaussNewton, minimize)
from culturalign.search.registry import optimizer_names

DIM = 4
TARGET = np.array([0.3, -0.2, 0.5, 0.1])


class Linear:
    """Residuals r(x) = M x - b (a Gauss-Newton problem with a known optimum); mass falls off with |x|."""

    dim = DIM

    def __init__(self):
        rng = np.random.default_rng(123)
        self.M = rng.normal(size=(3, DIM))
        self.b = self.M @ TARGET
        self.calls = 0

    def __call__(self, X, need_grad=False):
        X = np.asarray(X, dtype=float)
        self.calls += len(X)
        r = X @ self.M.T - self.b
        l1 = np.abs(r).sum(1)
        mass = 1.0 / (1.0 + (X**2).sum(1))
        grad = np.sign(r) @ self.M if need_grad else None
        return Evaluation(loss=l1, residuals=r, mass=mass, l1=l1, grad=grad)


def make(name, seed=0):
    if name == "de":
        return DifferentialEvolution(DIM, seed, DEConfig(popsize=6))
    if name == "cmaes":
        return CMAES(DIM, seed, popsize=6)
    if name == "dfols":
        return DFOLS(DIM, seed)
    if name == "random":
        return RandomSearch(DIM, seed, popsize=6)
    if name == "sgn":
        return SubspaceGaussNewton(np.zeros(DIM), (2, 2), seed, SGN, token_norm=1.0)
    return Adam(DIM, seed, lr=0.05)


SGN = SGNConfig(probes=4, steps=2, directions="gaussian", max_norm=0)
NAMES = ["de", "cmaes", pytest.param("dfols", marks=needs_dfols), "random", "adam", "sgn"]


def start_loss():
    return float(Linear()(np.zeros((1, DIM))).loss[0])


@pytest.mark.parametrize("name", NAMES)
def test_every_method_improves_within_the_budget(name):
    obj = Linear()
    res = minimize(obj, make(name), 60)
    assert res.nfev <= 60 and obj.calls == res.nfev
    assert res.fun < start_loss()
    assert res.fun == pytest.approx(float(obj(res.x[None]).loss[0]))
    h = res.history
    assert [e["evaluations"] for e in h] == sorted(e["evaluations"] for e in h)
    assert all(a["best_loss"] >= b["best_loss"] for a, b in zip(h, h[1:]))  # best so far never worsens
    assert h[-1]["evaluations"] == res.nfev


@pytest.mark.parametrize("name", [pytest.param("dfols", marks=needs_dfols), "sgn"])
def test_residual_methods_solve_a_linear_problem(name):
    """A linear residual model is home ground for the Gauss-Newton methods: far closer to the optimum than random."""
    res = minimize(Linear(), make(name), 40)
    floor = minimize(Linear(), make("random"), 40)
    assert res.fun < 1e-3 < floor.fun


@pytest.mark.parametrize("name", NAMES)
def test_budget_is_spent_in_whole_batches(name):
    res = minimize(Linear(), make(name), 20)
    if name == "sgn":  # the start point, then probes (4) and steps (2) in turn: 1+4+2+4+2+4 = 17, +2 = 19
        assert [e["evaluations"] for e in res.history] == [1, 5, 7, 11, 13, 17, 19]
        return
    batch = 6 if name in ("de", "cmaes", "random") else 1
    assert res.nfev == 20 // batch * batch


@pytest.mark.parametrize("name", NAMES)
def test_ask_twice_gives_the_same_points(name):
    opt = make(name)
    a = opt.ask()
    assert np.array_equal(a, opt.ask())
    opt.tell(a, Linear()(a, need_grad=opt.needs_gradient))
    getattr(opt, "close", lambda: None)()


@pytest.mark.parametrize("name", NAMES)
def test_resume_from_a_json_checkpoint_is_bit_identical(name):
    """Stop after k batches, round-trip the loop state through JSON, continue in a fresh optimizer."""
    whole = minimize(Linear(), make(name), 48)
    saved = []
    minimize(Linear(), make(name), 24, checkpoint=lambda s: saved.append(json.loads(json.dumps(s.to_json()))))
    obj = Linear()
    rest = minimize(obj, make(name), 48, state=LoopState.from_json(saved[-1]))
    assert obj.calls == whole.nfev - saved[-1]["history"][-1]["evaluations"]  # replay makes no objective calls
    timeless = lambda h: [{k: v for k, v in e.items() if k != "seconds"} for e in h]  # noqa: E731
    assert timeless(rest.history) == timeless(whole.history)
    assert np.array_equal(rest.x, whole.x) and rest.fun == whole.fun


def test_replay_refuses_a_log_from_another_engine_state():
    saved = []
    minimize(Linear(), make("cmaes"), 12, checkpoint=lambda s: saved.append(s.to_json()))
    state = json.loads(json.dumps(saved[-1]["optimizer"]))
    state["log"][1]["X"][0][0] += 0.5
    with pytest.raises(ValueError, match="replaying"):
        make("cmaes").load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        make("cmaes", seed=1).load_state_dict(saved[-1]["optimizer"])


def test_best_option_mass_is_the_best_points_mass():
    """The history's option mass belongs to the best point so far, not to the last batch's best trial."""
    res = minimize(Linear(), make("random"), 36)
    for e in res.history:
        assert e["best_option_mass"] == pytest.approx(1.0 / (1.0 + (np.asarray(res.x) ** 2).sum()))  \
            if e is res.history[-1] else True
    # recompute independently: replay every batch and track the best point's mass
    obj, opt, best, mass = Linear(), make("random"), np.inf, None
    for e in res.history:
        X = opt.ask()
        ev = obj(X)
        opt.tell(X, ev)
        i = int(np.argmin(ev.loss))
        if ev.loss[i] < best:
            best, mass = ev.loss[i], ev.mass[i]
        assert e["best_option_mass"] == mass and e["best_loss"] == best


def test_tell_checks_its_input():
    opt = make("random")
    X = opt.ask()
    with pytest.raises(ValueError, match="last ask"):
        opt.tell(X + 1, Linear()(X))
    with pytest.raises(ValueError, match="one evaluation per point"):
        opt.tell(X, Linear()(X[:2]))
    adam = make("adam")
    with pytest.raises(ValueError, match="gradient"):
        adam.tell(adam.ask(), Linear()(adam.ask()))


def test_non_finite_losses_never_become_the_best():
    class Broken(Linear):
        def __call__(self, X, need_grad=False):
            ev = super().__call__(X, need_grad)
            ev.loss[::2] = np.nan
            return ev

    res = minimize(Broken(), make("cmaes"), 24)
    assert np.isfinite(res.fun) and all(np.isfinite(e["best_loss"]) for e in res.history)


def test_the_registry_names_every_method():
    assert set(optimizer_names()) == {"de", "sgn", "cmaes", "dfols", "random", "adam", "adam-subspace"}
    black_box = (DifferentialEvolution, CMAES, DFOLS, RandomSearch, SubspaceGaussNewton)
    assert Adam.needs_gradient and not any(c.needs_gradient for c in black_box)
    assert CMAES.resume == DFOLS.resume == "replay"
    assert DifferentialEvolution.resume == RandomSearch.resume == Adam.resume == SubspaceGaussNewton.resume == "native"


def test_the_registry_agrees_with_each_engine():
    """The table's light facts (read without importing an engine) are the engines' own."""
    from culturalign.search.registry import OPTIMIZERS_TABLE, population_names

    assert population_names() == ("de", "cmaes", "random")
    for name, entry in OPTIMIZERS_TABLE.items():
        cls = entry.engine_class()
        assert entry.gradient == cls.needs_gradient, name
        assert entry.resume == cls.resume, name
        assert (entry.config_class() is not None) == (name in ("de", "sgn")), name
    assert OPTIMIZERS_TABLE["de"].config_class() is DEConfig and OPTIMIZERS_TABLE["sgn"].config_class() is SGNConfig


def test_a_new_method_is_one_registry_entry(monkeypatch):
    from culturalign.alignment.config import AlignConfig
    from culturalign.search import registry

    monkeypatch.setattr(registry, "OPTIMIZERS_TABLE", dict(registry.OPTIMIZERS_TABLE))
    registry.register_optimizer(registry.OptimizerEntry("random2", "culturalign.search.random:RandomSearch", population=True,
                                                        build=lambda e, s, dim, *a: RandomSearch(dim, s.seed, s.popsize, s.bound)))
    with pytest.raises(ValueError, match="already registered"):
        registry.register_optimizer(registry.OptimizerEntry("random2", "culturalign.search.random:RandomSearch"))
    cfg = AlignConfig(optimizer="random2", budget=12, popsize=4)
    assert cfg.batch_size == 4 and cfg.uses_projection and (cfg.mass_floor, cfg.mass_weight) == registry.MASS_DEFAULT
    assert isinstance(cfg.make_optimizer(DIM), RandomSearch)
    with pytest.raises(CulturalignError, match="expected one of de, sgn, cmaes, dfols, random, adam, adam-subspace, random2"):
        AlignConfig(optimizer="nope")


def test_config_errors_name_the_field():
    from culturalign.alignment.config import AlignConfig, flag
    from culturalign.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        DEConfig(popsize=2)
    assert str(e.value) == "popsize must be at least 4 for DE, got 2" and e.value.fields == ["popsize"]
    with pytest.raises(ConfigError) as e:
        AlignConfig(optimizer="sgn", sgn_steps=0)  # SGNConfig's `steps` is the run's `sgn_steps`
    assert str(e.value) == "sgn_steps must be an integer >= 1, got 0"
    assert e.value.named(flag) == "--sgn-steps must be an integer >= 1, got 0"


# ---- DFO-LS is an optional extra (GPL-3.0-or-later) -------------------------------------------------------

def test_dfols_without_the_package_is_one_error_saying_how_to_install_it(monkeypatch, tmp_path):
    import sys

    from culturalign import CulturalignError
    from culturalign.alignment.config import AlignConfig
    from culturalign.search.registry import dfols_missing
    from culturalign.experiments import load_spec

    monkeypatch.setitem(sys.modules, "dfols", None)  # as if DFO-LS were not installed: `import dfols` fails
    message = dfols_missing()
    assert message == ("--optimizer dfols needs the DFO-LS package, which is not installed; it is an optional extra "
                       "(GPL-3.0-or-later): pip install 'culturalign[dfols]'")
    with pytest.raises(CulturalignError) as e:
        AlignConfig(optimizer="dfols", budget=40)
    assert str(e.value) == message.removeprefix("--")  # the library names the field, the CLI its flag
    with pytest.raises(CulturalignError, match=r"pip install 'culturalign\[dfols\]'"):
        DFOLS(DIM, 0)
    AlignConfig(optimizer="de")  # every other method works without it
    f = tmp_path / "g.yaml"
    f.write_text("grid:\n  targets: [CN]\n  optimizers: [de, dfols]\n  budget: 40\n")
    with pytest.raises(CulturalignError, match=r"g.yaml: grid.optimizers\[1\]: --optimizer dfols needs the DFO-LS package"):
        load_spec(f)
