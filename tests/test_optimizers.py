"""The ask/tell Differential Evolution engine: scipy parity, strategies, bounds, resume, validation."""

import json

import numpy as np
import pytest
from scipy.optimize import OptimizeResult, differential_evolution, rosen

from culturalign import CulturalignError
from culturalign.search.de import STRATEGIES, DEConfig, DEEngine, minimize_de

SHIFT = np.array([1.5, -2.0, 0.7, 2.5, -1.2, 0.3, -0.8, 1.9])


def shifted_sphere(X):
    """[P, d] -> [P]; minimum 0 at SHIFT[:d] (not at the origin)."""
    X = np.atleast_2d(X)
    return ((X - SHIFT[: X.shape[1]]) ** 2).sum(-1)


def rosenbrock(X):
    return rosen(np.atleast_2d(X).T)  # minimum 0 at (1, ..., 1)


def run_scipy(f, d, lo, hi, popsize, generations, seed):
    """scipy's DE with the same population, F, CR, strategy and synchronous updating; counts evaluations."""
    count = [0]

    def g(x):  # vectorized: x is [d, S]
        count[0] += x.shape[1]
        return f(x.T)

    res = differential_evolution(
        g, [(lo, hi)] * d, popsize=popsize // d, maxiter=generations, vectorized=True, updating="deferred",
        polish=False, tol=0, atol=0, seed=seed, mutation=(0.5, 1.0), recombination=0.9, strategy="best1bin",
        init="latinhypercube",
    )
    return res.fun, count[0]


def run_ours(f, d, lo, hi, popsize, generations, seed):
    cfg = DEConfig(popsize=popsize, mutation=(0.5, 1.0), crossover=0.9, strategy="best1bin", include_origin=False)
    res = minimize_de(f, d, popsize * (generations + 1), cfg, seed, np.full(d, lo), np.full(d, hi))
    assert res.nfev == popsize * (generations + 1)
    return res.fun, res.nfev, res.x


@pytest.mark.parametrize("problem", [
    # name, function, dim, bounds, popsize, generations, optimum, tolerance
    ("sphere", shifted_sphere, 8, (-5.0, 5.0), 32, 120, SHIFT[:8], 1e-6),
    ("rosenbrock", rosenbrock, 4, (-2.0, 2.0), 32, 200, np.ones(4), 1e-3),
], ids=lambda p: p[0])
def test_de_matches_scipy_on_standard_functions(problem):
    name, f, d, (lo, hi), popsize, gens, xopt, tol = problem
    assert np.linalg.norm(xopt) > 1  # the optimum is away from the origin
    ours_ok = scipy_ok = 0
    for seed in range(3):
        fun, nfev, x = run_ours(f, d, lo, hi, popsize, gens, seed)
        s_fun, s_nfev = run_scipy(f, d, lo, hi, popsize, gens, seed)
        assert nfev >= s_nfev  # scipy may stop early on convergence; never more evaluations than ours
        assert f(x)[0] == pytest.approx(fun)
        ours_ok += fun < tol
        scipy_ok += s_fun < tol
        if fun < tol:
            np.testing.assert_allclose(x, xopt, atol=0.05)
    assert scipy_ok >= 2, f"scipy reference failed on {name}: budget too small"
    assert ours_ok >= 2, f"culturalign DE reached {name} < {tol} for only {ours_ok} of 3 seeds (scipy: {scipy_ok})"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_improves_and_stays_in_bounds(strategy):
    d, popsize = 5, 10
    lower, upper = np.array([-4.0, -3.0, 0.0, 1.0, -5.0]), np.array([4.0, 0.5, 2.0, 3.0, 5.0])
    opt = np.clip(SHIFT[:d], lower, upper)

    def f(X):
        return ((X - opt) ** 2).sum(-1)

    de = DEEngine(d, DEConfig(popsize=popsize, strategy=strategy, mutation=(0.5, 1.0),
                                           include_origin=False), seed=3, lower=lower, upper=upper)
    first = None
    for _ in range(40):
        x = de.ask()
        assert x.shape == (popsize, d)
        assert np.all(x >= lower) and np.all(x <= upper), "trial outside the bounds"
        de.tell(f(x))
        if first is None:
            first = de.best[1]
    assert de.generation == 39 and de.nfev == 400
    assert de.best[1] < 0.05 * first
    assert np.all(de.population >= lower) and np.all(de.population <= upper)


def test_strategies_differ():
    results = [minimize_de(shifted_sphere, 4, 60, DEConfig(popsize=6, strategy=s), seed=0).x for s in STRATEGIES]
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            assert not np.array_equal(results[i], results[j])


def test_out_of_bounds_components_are_resampled_not_clipped():
    # F = 2 from a best1bin mutant pushes many components outside a narrow box
    d = 6
    de = DEEngine(d, DEConfig(popsize=8, mutation=2.0, crossover=1.0, bound=0.5), seed=1)
    de.tell(shifted_sphere(de.ask()))
    trials = de.ask()
    assert np.all(np.abs(trials) <= 0.5)
    assert np.sum(np.isclose(np.abs(trials), 0.5)) == 0  # clipping would pile values on the bounds


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("popsize", [4, 5])
def test_smallest_populations(popsize, strategy):
    """DEConfig accepts popsize >= 4, so a population of 4 or 5 must run (or be refused by validate)."""
    try:
        cfg = DEConfig(popsize=popsize, strategy=strategy)
    except CulturalignError:
        assert strategy == "rand2bin"  # needs 5 distinct others: refusing it is fine
        return
    res = minimize_de(shifted_sphere, 3, popsize * 4, cfg, seed=0)
    assert res.nit == 3 and res.nfev == popsize * 4


def test_tell_rejects_wrong_number_of_values():
    de = DEEngine(3, DEConfig(popsize=6), seed=0)
    with pytest.raises(ValueError):
        de.tell(np.zeros(6))  # nothing asked yet
    x = de.ask()
    with pytest.raises(ValueError):
        de.tell(np.zeros(5))
    with pytest.raises(ValueError):
        de.tell(np.zeros(7))
    de.tell(shifted_sphere(x))  # still usable
    assert de.nfev == 6


def test_ask_twice_returns_the_same_batch():
    de = DEEngine(3, DEConfig(popsize=6), seed=0)
    a = de.ask()
    a[:] = 99.0  # a copy: mutating it does not change the pending batch
    b = de.ask()
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(b, de.ask())


def test_nan_fitness_is_worst():
    de = DEEngine(2, DEConfig(popsize=6, include_origin=False), seed=0)
    x = de.ask()
    values = shifted_sphere(x)
    values[np.argmin(values)] = np.nan
    de.tell(values)
    assert np.isinf(de.fitness).sum() == 1 and np.all(de.fitness > 0)
    assert np.isfinite(de.best[1])
    assert de.best[1] == np.nanmin(values)
    # NaN trials never replace a finite parent
    before_pop, before_fit = de.population.copy(), de.fitness.copy()
    de.ask()
    de.tell(np.full(6, np.nan))
    finite = np.isfinite(before_fit)
    np.testing.assert_array_equal(de.population[finite], before_pop[finite])
    np.testing.assert_array_equal(de.fitness[finite], before_fit[finite])


def test_include_origin():
    with_origin = DEEngine(4, DEConfig(popsize=6, include_origin=True), seed=5).ask()
    without = DEEngine(4, DEConfig(popsize=6, include_origin=False), seed=5).ask()
    np.testing.assert_array_equal(with_origin[0], np.zeros(4))
    np.testing.assert_array_equal(with_origin[1:], without[1:])  # only the first individual is replaced
    assert not np.any(np.all(without == 0, axis=1))


@pytest.mark.parametrize("popsize,d", [(6, 3), (10, 7), (17, 2)])
def test_initial_population_is_latin_hypercube(popsize, d):
    lower, upper = np.linspace(-3, 0, d), np.linspace(1, 5, d)
    pop = DEEngine(d, DEConfig(popsize=popsize, include_origin=False), seed=popsize,
                                lower=lower, upper=upper).ask()
    assert pop.shape == (popsize, d)
    strata = np.floor((pop - lower) / (upper - lower) * popsize).astype(int)
    for j in range(d):
        assert sorted(strata[:, j]) == list(range(popsize)), f"coordinate {j}: {sorted(strata[:, j])}"
    # coordinates are permuted independently (not the same order in every column)
    assert any(not np.array_equal(strata[:, 0], strata[:, j]) for j in range(1, d))


def _step(de, f=shifted_sphere):
    de.tell(f(de.ask()))


def _roundtrip(de):
    return DEEngine.from_state(json.loads(json.dumps(de.state_dict())))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exact_resume_after_tell(strategy):
    cfg = DEConfig(popsize=7, strategy=strategy, mutation=(0.4, 1.2))
    de = DEEngine(5, cfg, seed=11)
    for _ in range(3):  # initial population + 2 generations
        _step(de)
    copy = _roundtrip(de)
    assert copy.generation == de.generation == 2 and copy.nfev == de.nfev == 21
    for _ in range(4):
        _step(de)
        _step(copy)
        assert np.array_equal(de.population, copy.population)
        assert np.array_equal(de.fitness, copy.fitness)
    assert copy.generation == 6 and copy.nfev == de.nfev
    assert copy.config == de.config


def test_exact_resume_between_ask_and_tell():
    de = DEEngine(4, DEConfig(popsize=6), seed=2)
    _step(de)
    _step(de)
    asked = de.ask()
    copy = _roundtrip(de)
    np.testing.assert_array_equal(copy.ask(), asked)  # the pending batch survives
    de.tell(shifted_sphere(asked))
    copy.tell(shifted_sphere(copy.ask()))
    for _ in range(3):
        _step(de)
        _step(copy)
    assert np.array_equal(de.population, copy.population) and np.array_equal(de.fitness, copy.fitness)
    assert de.nfev == copy.nfev == 36


def test_resume_before_first_tell():
    de = DEEngine(3, DEConfig(popsize=6), seed=4)
    copy = _roundtrip(de)  # nothing asked yet
    for _ in range(3):
        _step(de)
        _step(copy)
    assert np.array_equal(de.population, copy.population)


def test_state_dict_is_json_and_explicit_bounds_survive():
    lower, upper = np.array([0.0, -1.0]), np.array([2.0, 3.0])
    de = DEEngine(2, DEConfig(popsize=6, mutation=0.7), seed=0, lower=lower, upper=upper)
    _step(de)
    state = json.loads(json.dumps(de.state_dict()))
    copy = DEEngine.from_state(state)
    np.testing.assert_array_equal(copy.lower, lower)
    np.testing.assert_array_equal(copy.upper, upper)
    assert copy.config.mutation == 0.7


def test_same_seed_same_result_different_seed_differs():
    cfg = DEConfig(popsize=8)
    a = minimize_de(shifted_sphere, 5, 80, cfg, seed=7)
    b = minimize_de(shifted_sphere, 5, 80, cfg, seed=7)
    c = minimize_de(shifted_sphere, 5, 80, cfg, seed=8)
    assert np.array_equal(a.x, b.x) and a.fun == b.fun
    assert np.array_equal(a.population, b.population)
    assert not np.array_equal(a.population, c.population)


def test_minimize_de_result():
    res = minimize_de(shifted_sphere, 3, 50, DEConfig(popsize=6), seed=0)
    assert isinstance(res, OptimizeResult)
    assert res.nfev == 48 and res.nfev % 6 == 0 and res.nfev <= 50  # 8 batches of 6
    assert res.nit == 7
    assert res.x.shape == (3,)
    assert res.fun == pytest.approx(shifted_sphere(res.x)[0])
    assert res.fun == res.population_energies.min()
    assert len(res.history) == 8
    assert [h["nfev"] for h in res.history] == list(range(6, 49, 6))
    best = [h["best"] for h in res.history]
    assert all(b2 <= b1 for b1, b2 in zip(best, best[1:]))
    assert best[-1] == res.fun
    assert all(h["mean"] >= h["best"] for h in res.history)


def test_minimize_de_callback_stops():
    seen = []

    def cb(de):
        seen.append(de.generation)
        return de.generation >= 2

    res = minimize_de(shifted_sphere, 3, 600, DEConfig(popsize=6), seed=0, callback=cb)
    assert seen == [0, 1, 2] and res.nfev == 18 and res.nit == 2


@pytest.mark.parametrize("kwargs,needle", [
    ({"popsize": 3}, "popsize"),
    ({"popsize": 0}, "popsize"),
    ({"strategy": "best2exp"}, "strategy"),
    ({"mutation": 0.0}, "mutation"),
    ({"mutation": 2.5}, "mutation"),
    ({"mutation": (1.0, 0.5)}, "mutation"),
    ({"mutation": (0.0, 1.0)}, "mutation"),
    ({"crossover": -0.1}, "crossover"),
    ({"crossover": 1.5}, "crossover"),
    ({"bound": 0.0}, "bound"),
    ({"bound": -1.0}, "bound"),
    ({"bound": float("inf")}, "bound"),
    ({"bound": float("nan")}, "bound"),
    ({"mutation": float("nan")}, "mutation"),
    ({"crossover": float("nan")}, "crossover"),
])
def test_config_validation(kwargs, needle):
    with pytest.raises(CulturalignError, match=needle):
        DEConfig(**kwargs)
    with pytest.raises(CulturalignError):
        DEEngine(3, DEConfig(**kwargs))


def test_config_valid_edges():
    DEConfig(popsize=4, mutation=2.0, crossover=0.0, bound=1e-3)
    DEConfig(mutation=(0.5, 0.5), crossover=1.0)
