"""`culturalign experiment`: grid files, the experiment folder (skip / resume / extend), tables, report, Ray.

Cells run on the tiny random model of conftest (tokens 2, dim 2, budgets of one or two generations).
The one local-Ray test starts a 2-CPU cluster with bounded cell timeouts and shuts it down.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import needs_dfols

from culturalign import CulturalignError
from culturalign.search.registry import optimizer_names
from culturalign.cli import run
from culturalign.experiments import load_spec, plan, run_experiment
from culturalign.experiments.executors import LocalExecutor, RayExecutor, make_executor
from culturalign.experiments.report import build_report, cell_columns, dimension_errors, kendall
from culturalign.experiments.runner import CELLS_DIR, SPEC_FILE

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = ["PDI", "IDV", "MAS", "UAI", "LTO", "IVR"]
TIMING = {"search_seconds", "seconds_to_half_naive", "seconds"}
GRID = """\
name: tiny-grid
model: {model}
grid:
  targets: [CN, {{country: US}}, SA@hofstede-2023]
  optimizers: [de, adam]
  seeds: [0]
  budget: 12
settings: {{tokens: 2, dim: 2, sigma: 2.0, popsize: 6}}
optimizer_settings: {{adam: {{budget: 2, lr: 0.1}}}}
"""


def write(folder: Path, name: str, text: str) -> Path:
    p = Path(folder) / name
    p.write_text(text, encoding="utf-8")
    return p


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(folder).rglob("*"))}


def one_line_error(argv, capsys) -> str:
    capsys.readouterr()
    code = run(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def grid_run(tiny_lm, tmp_path_factory):
    """3 targets x (de, adam) x seed 0 on the tiny model, run in this process."""
    folder = tmp_path_factory.mktemp("grid")
    spec = write(folder, "grid.yaml", GRID.format(model="tiny"))
    exp = load_spec(spec)
    events = []
    result = run_experiment(exp, folder / "out", LocalExecutor(backend=tiny_lm),
                            progress=lambda kind, s, info: events.append((kind, s.cell.name, dict(info))))
    return exp, folder / "out", result, events


# ---- the file: grid expansion ------------------------------------------------------------------------------

def test_grid_expands_targets_optimizers_seeds(tmp_path):
    spec = write(tmp_path, "g.yaml", """
grid:
  targets: [{country: SA, set: hofstede-2023}, United States]
  optimizers: [de, adam]
  seeds: [0, 7]
  budget: 18
settings: {tokens: 3, sigma: 5, constants: {PDI: 50}}
optimizer_settings: {adam: {budget: 4, lr: 0.05}}
""")
    exp = load_spec(spec)
    assert exp.name == "g" and exp.model == "smollm2-135m" and exp.instrument.id == "vsm2013"
    assert [c.name for c in exp.cells] == [
        "SA-hofstede-2023-de-s0", "SA-hofstede-2023-de-s7", "SA-hofstede-2023-adam-s0", "SA-hofstede-2023-adam-s7",
        "US-hofstede-2015-de-s0", "US-hofstede-2015-de-s7", "US-hofstede-2015-adam-s0", "US-hofstede-2015-adam-s7"]
    by = {c.name: c for c in exp.cells}
    de, adam = by["SA-hofstede-2023-de-s7"], by["US-hofstede-2015-adam-s0"]
    assert (de.optimizer, de.seed, de.budget, de.code, de.set_name) == ("de", 7, 18, "SA", "hofstede-2023")
    assert de.target.name == "Saudi Arabia" and de.config.tokens == 3 and de.config.sigma == 5.0
    assert isinstance(de.config.sigma, float) and de.config.lr == 0.02  # AlignConfig's default
    assert adam.budget == 4 and adam.config.lr == 0.05 and adam.config.tokens == 3
    assert de.config.constants == {d: (50.0 if d == "PDI" else 0.0) for d in DIMS}  # every index, as align records
    assert exp.dims == DIMS


def test_toml_and_yaml_describe_the_same_experiment(tmp_path):
    y = write(tmp_path, "a.yaml", "name: x\ngrid:\n  targets: [CN, SA@hofstede-2023]\n  optimizers: [de]\n  budget: 12\n"
                                  "settings:\n  mutation: [0.4, 0.9]\n  tokens: 2\n")
    t = write(tmp_path, "a.toml", 'name = "x"\n[grid]\ntargets = ["CN", {country = "SA", set = "hofstede-2023"}]\n'
                                  'optimizers = ["de"]\nbudget = 12\n[settings]\nmutation = [0.4, 0.9]\ntokens = 2\n')
    a, b = load_spec(y), load_spec(t)
    assert a.normalised() == b.normalised()
    assert a.cells[0].config.mutation == (0.4, 0.9) and a.seeds == [0]


def test_shipped_experiment_files():
    """paper.yaml (the paper's four targets with the default method, sgn) and paper-de.yaml (the same grid with
    the paper's DE, 32 tokens through a 16-d projection at sigma 40) load and expand as documented."""
    root = Path(__file__).resolve().parents[1] / "experiments"
    four = [("SA", "hofstede-2023"), ("US", "hofstede-2015"), ("CN", "hofstede-2015"), ("IN", "hofstede-2015")]
    paper = load_spec(root / "paper.yaml")
    assert [(t.iso2, t.set_name) for t in paper.targets] == four
    assert paper.optimizers == ["sgn"] and paper.seeds == [0] and {c.budget for c in paper.cells} == {200}
    de = load_spec(root / "paper-de.yaml")
    assert [(t.iso2, t.set_name) for t in de.targets] == four and de.optimizers == ["de"] and de.name == "paper-de"
    assert {(c.config.budget, c.config.tokens, c.config.dim, c.config.sigma) for c in de.cells} == {(200, 32, 16, 40.0)}


@needs_dfols
def test_shipped_experiment_files_with_dfols():
    """china.yaml runs dfols too (the optional DFO-LS extra); china-seeds.yaml is DE, the default, over three seeds."""
    root = Path(__file__).resolve().parents[1] / "experiments"
    china = load_spec(root / "china.yaml")
    assert china.optimizers == ["adam-subspace", "cmaes", "random", "adam", "dfols"]
    assert {c.optimizer: c.budget for c in china.cells} == {"adam-subspace": 30, "cmaes": 200, "random": 200,
                                                            "adam": 30, "dfols": 200}
    seeds = load_spec(root / "china-seeds.yaml")
    assert [t.iso2 for t in seeds.targets] == ["CN"] and seeds.seeds == [0, 1, 2]
    assert seeds.optimizers == ["de"] and len(seeds.cells) == 3
    for name, optimizer, setting in (("china-order", "de", ("order", "both")), ("china-sgn", "sgn", None),
                                     ("china-contrast", "de", ("contrast", 0.5))):
        spec = load_spec(root / f"{name}.yaml")
        assert spec.optimizers == [optimizer] and [c.config.seed for c in spec.cells] == [0]
        if setting:
            assert getattr(spec.cells[0].config, setting[0]) == setting[1]


# ---- the file: bad input, one line naming the file and the key -------------------------------------------------

GOOD = {"grid": "grid:\n  targets: [CN]\n  optimizers: [de]\n  budget: 12\n"}
BAD_FILES = [
    ("unknown-top-key", "g.yaml", "grdi: {}\n" + GOOD["grid"], "g.yaml: grdi: unknown key; expected one of name, model"),
    ("unknown-grid-key", "g.yaml", GOOD["grid"] + "  seed: [1]\n", "g.yaml: grid.seed: unknown key"),
    ("unknown-target-key", "g.yaml", "grid:\n  targets: [{country: CN, sets: x}]\n  optimizers: [de]\n",
     "g.yaml: grid.targets[0].sets: unknown key; expected one of country, set"),
    ("unknown-optimizer", "g.yaml", "grid:\n  targets: [CN]\n  optimizers: [de, adam, foo]\n",
     f"g.yaml: grid.optimizers[2]: unknown optimizer 'foo'; expected one of {', '.join(optimizer_names())}"),
    ("unknown-country", "g.yaml", "grid:\n  targets: [CN, Atlantis]\n  optimizers: [de]\n",
     "g.yaml: grid.targets[1].country: unknown country or region 'Atlantis'"),
    ("unknown-set", "g.yaml", "grid:\n  targets: [CN@hofstede-1999]\n  optimizers: [de]\n",
     "g.yaml: grid.targets[0].set: unknown target set 'hofstede-1999'"),
    ("empty-targets", "g.yaml", "grid:\n  targets: []\n  optimizers: [de]\n", "g.yaml: grid.targets: empty"),
    ("empty-optimizers", "g.yaml", "grid:\n  targets: [CN]\n  optimizers: []\n", "g.yaml: grid.optimizers: empty"),
    ("empty-seeds", "g.yaml", GOOD["grid"] + "  seeds: []\n", "g.yaml: grid.seeds: empty"),
    ("no-grid", "g.yaml", "name: x\n", "g.yaml: grid: missing"),
    ("no-optimizers", "g.yaml", "grid:\n  targets: [CN]\n", "g.yaml: grid.optimizers: missing"),
    ("empty-file", "g.yaml", "# nothing\n", "g.yaml: the file is empty"),
    ("not-a-table", "g.yaml", "- CN\n- US\n", "g.yaml: expected a table of keys"),
    ("same-target-twice", "g.yaml", "grid:\n  targets: [CN, China]\n  optimizers: [de]\n",
     "g.yaml: grid.targets[1]: China (hofstede-2015) is already in the grid as targets[0]"),
    ("optimizer-twice", "g.yaml", "grid:\n  targets: [CN]\n  optimizers: [de, de]\n", "g.yaml: grid.optimizers[1]: 'de' is given twice"),
    ("seed-twice", "g.yaml", GOOD["grid"] + "  seeds: [1, 1]\n", "g.yaml: grid.seeds[1]: seed 1 is given twice"),
    ("seed-negative", "g.yaml", GOOD["grid"] + "  seeds: [0, -1]\n", "g.yaml: grid.seeds[1]: must be between 0 and 2^32 - 1"),
    ("seed-bool", "g.yaml", GOOD["grid"] + "  seeds: [true]\n", "g.yaml: grid.seeds[0]: input should be a valid integer"),
    ("budget-text", "g.yaml", "grid:\n  targets: [CN]\n  optimizers: [de]\n  budget: lots\n", "g.yaml: grid.budget:"),
    ("budget-too-small", "g.yaml", "grid:\n  targets: [CN]\n  optimizers: [de]\n  budget: 10\n",
     "g.yaml: grid.budget: 10 is too small for a population of 6"),
    ("setting-unknown", "g.yaml", GOOD["grid"] + "settings: {tokenz: 3}\n",
     "g.yaml: settings.tokenz: unknown setting; expected one of"),
    ("setting-is-grid", "g.yaml", GOOD["grid"] + "settings: {seed: 3}\n", "g.yaml: settings.seed: set by the grid; use grid.seeds"),
    ("setting-budget", "g.yaml", GOOD["grid"] + "settings: {budget: 30}\n", "g.yaml: settings.budget: the budget is grid.budget"),
    ("setting-type", "g.yaml", GOOD["grid"] + "settings: {tokens: two}\n", "g.yaml: settings.tokens: expected int, got 'two'"),
    ("setting-bool", "g.yaml", GOOD["grid"] + "settings: {sigma: true}\n", "g.yaml: settings.sigma: expected float, got True"),
    ("setting-nan", "g.yaml", GOOD["grid"] + "settings: {sigma: .nan}\n", "g.yaml: settings.sigma: must be a finite number > 0"),
    ("setting-popsize", "g.yaml", GOOD["grid"] + "settings: {popsize: 3}\n", "g.yaml: settings.popsize:"),
    ("setting-constant", "g.yaml", GOOD["grid"] + "settings: {constants: {XYZ: 5}}\n", "g.yaml: settings.constants: unknown index 'XYZ'"),
    ("setting-prompt", "g.yaml", GOOD["grid"] + "settings: {prompt: chatty}\n", "g.yaml: settings.prompt: 'chatty'"),
    ("optimizer-setting", "g.yaml", GOOD["grid"] + "optimizer_settings: {de: {lr: -1}}\n",
     "g.yaml: optimizer_settings.de.lr: must be a finite number > 0"),
    ("optimizer-settings-unknown", "g.yaml", GOOD["grid"] + "optimizer_settings: {sgd: {lr: 1}}\n",
     "g.yaml: optimizer_settings.sgd: unknown optimizer 'sgd'"),
    ("instrument-unknown", "g.yaml", "instrument: vsm1994\n" + GOOD["grid"], "g.yaml: instrument:"),
    ("yaml-duplicate-key", "g.yaml", "name: a\nname: b\n" + GOOD["grid"], "g.yaml: not valid YAML (line 2, column 1: key 'name' is given twice)"),
    ("yaml-syntax", "g.yaml", "grid: [targets\n", "g.yaml: not valid YAML (line"),
    ("toml-syntax", "g.toml", "[grid\n", "g.toml: not valid TOML"),
    ("toml-unknown-key", "g.toml", '[grid]\ntargets = ["CN"]\noptimizers = ["de"]\ncolour = 1\n', "g.toml: grid.colour: unknown key"),
    ("suffix", "g.json", "{}", "'g.json': expected a .yaml, .yml or .toml file"),
]


@pytest.mark.parametrize("name,text,needle", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_experiment_file_is_one_clear_error(name, text, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, name, text)
    before = snapshot(tmp_path)
    with pytest.raises(CulturalignError) as e:
        load_spec(name)
    msg = str(e.value)
    assert needle in msg, msg
    assert "\n" not in msg
    assert snapshot(tmp_path) == before


def test_missing_file(tmp_path):
    with pytest.raises(CulturalignError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


# ---- a run: the folder, cells.csv, curves.csv, the report ------------------------------------------------------

def test_run_writes_the_folder(grid_run):
    exp, out, result, events = grid_run
    assert sorted(p.name for p in out.iterdir()) == ["cells", "cells.csv", "curves.csv", "experiment.json", "plots", "report.md"]
    assert sorted(p.name for p in (out / CELLS_DIR).iterdir()) == sorted(c.name for c in exp.cells)
    for c in exp.cells:  # each cell is an ordinary align folder
        cell = out / CELLS_DIR / c.name
        assert (cell / "adapter_model.safetensors").is_file() and (cell / "report.md").is_file()
        assert json.loads((cell / "checkpoint.json").read_text())["finished"] is True
    stored = json.loads((out / SPEC_FILE).read_text())
    assert stored["schema"] == "culturalign.experiment/1" and stored["spec"] == exp.normalised()
    assert result.ran == 6 and not result.failed
    starts = [name for kind, name, _ in events if kind == "start"]
    assert starts == [c.name for c in exp.cells]
    assert any(kind == "progress" and info["evaluations"] == 12 for kind, _, info in events)


def test_cells_csv(grid_run):
    exp, out, _, _ = grid_run
    rows = read_csv(out / "cells.csv")
    keys = ["CN-hofstede-2015", "US-hofstede-2015", "SA-hofstede-2023"]
    assert list(rows[0]) == cell_columns(DIMS, keys)
    assert cell_columns(DIMS, keys)[:len(cell_columns(DIMS))] == cell_columns(DIMS)  # new columns only appended
    for col in ("country", "code", "set", "optimizer", "seed", "budget", "evaluations", "naive_l1", "icl_l1", "aligned_l1",
                "ratio", "search_seconds", "evals_to_half_naive", "seconds_to_half_naive", "status",
                *[f"err_{d}" for d in DIMS]):
        assert col in rows[0], col
    assert [r["cell"] for r in rows] == [c.name for c in exp.cells]
    for r in rows:
        res = json.loads((out / CELLS_DIR / r["cell"] / "result.json").read_text())
        p = res["profiles"]
        assert r["status"] == "finished" and int(r["evaluations"]) == res["evaluations"]
        assert float(r["naive_l1"]) == p["naive"]["l1"] and float(r["aligned_l1"]) == p["aligned"]["l1"]
        assert float(r["ratio"]) == pytest.approx(p["aligned"]["l1"] / p["naive"]["l1"])
        target = p["aligned"]["target"]["scores"]
        for d in DIMS:
            if d in target:
                assert float(r[f"err_{d}"]) == pytest.approx(abs(p["aligned"]["indices"][d] - target[d]))
                assert float(r[f"target_{d}"]) == target[d]
            else:
                assert r[f"err_{d}"] == ""
        half = p["naive"]["l1"] / 2
        hit = [h for h in res["history"] if h.get("best_l1", h["best_loss"]) <= half]
        assert r["evals_to_half_naive"] == (str(hit[0]["evaluations"]) if hit else "")
        # the uniform floor, and the aligned profile against every grid target (its own column is its L1)
        assert float(r["uniform_l1"]) == p["uniform"]["l1"] == sum(target.values())
        assert float(r["ratio_uniform"]) == pytest.approx(p["aligned"]["l1"] / p["uniform"]["l1"])
        own = f"{r['code']}-{r['set']}"
        assert float(r[f"l1_to_{own}"]) == float(r["aligned_l1"])
        l1s = {k: float(r[f"l1_to_{k}"]) for k in keys}
        assert int(r["own_rank"]) == 1 + sum(v < l1s[own] for v in l1s.values())
        assert float(r["specificity"]) == pytest.approx(sum(v for k, v in l1s.items() if k != own) / 2 - l1s[own])
    assert {r["budget"] for r in rows if r["optimizer"] == "adam"} == {"2"}
    sa = [r for r in rows if r["code"] == "SA"]  # the 2023 set publishes all six for Saudi Arabia
    assert sa and all(r["set"] == "hofstede-2023" and r["err_PDI"] != "" for r in sa)


def test_curves_csv(grid_run):
    exp, out, _, _ = grid_run
    rows = read_csv(out / "curves.csv")
    assert list(rows[0]) == ["cell", "code", "set", "optimizer", "seed", "evaluations", "best_l1", "seconds"]
    for c in exp.cells:
        mine = [r for r in rows if r["cell"] == c.name]
        res = json.loads((out / CELLS_DIR / c.name / "result.json").read_text())
        assert [int(r["evaluations"]) for r in mine] == [h["evaluations"] for h in res["history"]]
        best = [float(r["best_l1"]) for r in mine]
        assert best == sorted(best, reverse=True)  # best so far never rises


def test_report(grid_run):
    exp, out, _, _ = grid_run
    text = (out / "report.md").read_text()
    for needle in ("# Experiment tiny-grid", "## L1 to the target", "## Convergence", "## Evaluations and seconds to reach ½ naive",
                   "## Per-dimension absolute error", "## Kendall τ", "| China | hofstede-2015 |", "| Saudi Arabia | hofstede-2023 |"):
        assert needle in text, needle
    for t in exp.targets:
        png = out / "plots" / f"convergence-{t.iso2}-{t.set_name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{png.name}" in text
    assert "## Specificity: each aligned profile against every grid target" in text and "| *uniform* |" in text
    for opt in ("de", "adam"):
        png = out / "plots" / f"specificity-{opt}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{png.name}" in text
    kendall_rows = [ln for ln in text.splitlines() if ln.startswith("| PDI |")]
    assert len(kendall_rows) == 2 and "undefined (no variation)" in kendall_rows[1]  # naive: same for every target


def test_rerun_of_a_finished_experiment_runs_nothing(grid_run, tiny_lm):
    exp, out, _, _ = grid_run
    before = {p: (out / p).read_bytes() for p in ("cells.csv", "curves.csv", "report.md", "experiment.json")}
    cells = snapshot(out / CELLS_DIR)

    class NoModel(LocalExecutor):
        def open(self, *a):
            raise AssertionError("a finished experiment must not load the model")

    result = run_experiment(exp, out, NoModel())
    assert result.ran == 0 and [s.status for s in result.states] == ["done"] * 6
    assert snapshot(out / CELLS_DIR) == cells
    assert {p: (out / p).read_bytes() for p in before} == before


# ---- resume, extend, a changed file ------------------------------------------------------------------------------

SMALL = """\
model: tiny
grid:
  targets: [CN, US]
  optimizers: [de]
  budget: {budget}
settings: {{tokens: 2, dim: 2, sigma: 2.0}}
"""


class Interrupt(KeyboardInterrupt):
    pass


def test_interrupted_grid_resumes_and_matches_an_uninterrupted_one(tiny_lm, tmp_path):
    spec = write(tmp_path, "g.yaml", SMALL.format(budget=18))
    exp = load_spec(spec)
    ref = run_experiment(exp, tmp_path / "ref", LocalExecutor(backend=tiny_lm))

    out = tmp_path / "out"
    second = exp.cells[1].name

    def stop_in_second_cell(kind, state, info):
        if kind == "progress" and state.cell.name == second and info["evaluations"] == 6:
            raise Interrupt()  # after the second cell's first checkpoint

    with pytest.raises(Interrupt):
        run_experiment(exp, out, LocalExecutor(backend=tiny_lm), progress=stop_in_second_cell)
    assert not (out / "cells.csv").exists() and (out / SPEC_FILE).is_file()
    first = snapshot(out / CELLS_DIR / exp.cells[0].name)
    states = plan(load_spec(spec), out)
    assert [(s.status, s.evaluations) for s in states] == [("done", 18), ("partial", 6)]

    started = []
    result = run_experiment(load_spec(spec), out, LocalExecutor(backend=tiny_lm), states=states,
                            progress=lambda kind, s, info: kind == "start" and started.append((s.cell.name, info["evaluations"])))
    assert started == [(second, 6)] and result.ran == 1
    assert snapshot(out / CELLS_DIR / exp.cells[0].name) == first  # the finished cell is skipped, untouched
    assert without_timing(read_csv(out / "cells.csv")) == without_timing(read_csv(tmp_path / "ref" / "cells.csv"))
    assert without_timing(read_csv(out / "curves.csv")) == without_timing(read_csv(tmp_path / "ref" / "curves.csv"))
    assert ref.rows[1]["aligned_l1"] == result.rows[1]["aligned_l1"]


def test_a_larger_budget_extends_the_cells(tiny_lm, tmp_path):
    out = tmp_path / "out"
    run_experiment(load_spec(write(tmp_path, "g.yaml", SMALL.format(budget=12))), out, LocalExecutor(backend=tiny_lm))
    grown = load_spec(write(tmp_path, "g.yaml", SMALL.format(budget=18)))
    assert [s.status for s in plan(grown, out)] == ["extend", "extend"]
    result = run_experiment(grown, out, LocalExecutor(backend=tiny_lm))
    assert [r["evaluations"] for r in result.rows] == [18, 18]
    assert json.loads((out / SPEC_FILE).read_text())["spec"]["cells"][grown.cells[0].name]["budget"] == 18
    fresh = run_experiment(grown, tmp_path / "fresh", LocalExecutor(backend=tiny_lm))
    assert [r["aligned_l1"] for r in result.rows] == [r["aligned_l1"] for r in fresh.rows]
    with pytest.raises(CulturalignError, match=r"g.yaml: grid.budget: 12 is below the 18 evaluations"):
        plan(load_spec(write(tmp_path, "g.yaml", SMALL.format(budget=12))), out)


def test_changed_file_is_refused_with_the_keys(tiny_lm, tmp_path, tiny_dir, capsys):
    out = tmp_path / "out"
    text = SMALL.format(budget=12).replace("model: tiny", f"model: {tiny_dir}")
    run_experiment(load_spec(write(tmp_path, "g.yaml", text)), out, LocalExecutor(backend=tiny_lm))
    before = snapshot(tmp_path)
    for change, keys in [(("sigma: 2.0", "sigma: 3.0"), "settings.sigma"), (("[CN, US]", "[CN, JP]"), "grid.targets"),
                         (("[de]", "[de, adam]"), "grid.optimizers")]:
        write(tmp_path, "h.yaml", text.replace(*change))
        line = one_line_error(["experiment", str(tmp_path / "h.yaml"), "--out", str(out)], capsys)
        assert "has changed since the experiment" in line and f"(changed: {keys})" in line, line
        (tmp_path / "h.yaml").unlink()
    assert snapshot(tmp_path) == before


def test_a_new_file_may_replace_one_whose_cells_never_started(tmp_path):
    out = tmp_path / "out"
    exp = load_spec(write(tmp_path, "g.yaml", SMALL.format(budget=12)))
    from culturalign.experiments.runner import write_spec

    write_spec(exp, out)  # e.g. the model failed to load before the first cell
    other = load_spec(write(tmp_path, "g.yaml", SMALL.format(budget=12).replace("sigma: 2.0", "sigma: 3.0")))
    assert [s.status for s in plan(other, out)] == ["new", "new"]


def test_out_holding_something_else_is_refused(tmp_path):
    exp = load_spec(write(tmp_path, "g.yaml", SMALL.format(budget=12)))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    with pytest.raises(CulturalignError, match="not empty and holds no culturalign experiment"):
        plan(exp, tmp_path / "o")
    cell = tmp_path / "p" / CELLS_DIR / exp.cells[0].name
    cell.mkdir(parents=True)
    (cell / "result.json").write_text("{}")
    with pytest.raises(CulturalignError, match=f"cell {exp.cells[0].name}: .*without its checkpoint.json"):
        plan(exp, tmp_path / "p")


def test_a_failed_cell_is_recorded_and_retried(tiny_lm, tmp_path, monkeypatch):
    import culturalign.alignment.run

    exp = load_spec(write(tmp_path, "g.yaml", SMALL.format(budget=12)))
    real = culturalign.alignment.run.Aligner.run

    def fail_for_us(self):
        if self.target.iso2 == "US":
            raise CulturalignError("no candidate gave a finite loss")
        return real(self)

    monkeypatch.setattr(culturalign.alignment.run.Aligner, "run", fail_for_us)
    with pytest.raises(CulturalignError, match=r"1 of 2 cells did not finish \(first: US-hofstede-2015-de-s0, failed: no candidate"):
        run_experiment(exp, tmp_path / "out", LocalExecutor(backend=tiny_lm))
    rows = read_csv(tmp_path / "out" / "cells.csv")
    assert [r["status"] for r in rows] == ["finished", "failed"] and rows[1]["aligned_l1"] == ""
    assert "US-hofstede-2015-de-s0: failed" in (tmp_path / "out" / "report.md").read_text()
    monkeypatch.setattr(culturalign.alignment.run.Aligner, "run", real)
    result = run_experiment(exp, tmp_path / "out", LocalExecutor(backend=tiny_lm))
    assert result.ran == 1 and [r["status"] for r in result.rows] == ["finished", "finished"]


def test_settings_the_model_refuses_fail_before_anything_is_written(tiny_lm, tmp_path):
    exp = load_spec(write(tmp_path, "g.yaml", SMALL.format(budget=12).replace("dim: 2", "dim: 100000")))
    with pytest.raises(CulturalignError, match="--dim"):
        run_experiment(exp, tmp_path / "out", LocalExecutor(backend=tiny_lm))
    assert not (tmp_path / "out").exists()


# ---- the tables on crafted rows -------------------------------------------------------------------------------------

def crafted(n_targets: int, dims=("A", "B", "C")) -> list[dict]:
    """Rows whose aligned A ranks the targets as their scores do, B in reverse, and C always the same."""
    rows = []
    for i in range(n_targets):
        for seed in (0, 1):
            r = {"cell": f"T{i}-s-de-s{seed}", "country": f"Target {i}", "code": f"T{i}", "set": "s", "optimizer": "de",
                 "seed": seed, "budget": 10, "evaluations": 10, "naive_l1": 100.0, "icl_l1": 90.0,
                 "aligned_l1": 40.0 + seed, "ratio": (40.0 + seed) / 100, "status": "finished", "error": None,
                 "search_seconds": 1.0, "evals_to_half_naive": 6 if seed == 0 else None,
                 "seconds_to_half_naive": 0.5 if seed == 0 else None}
            target = {"A": 10.0 * i, "B": 10.0 * i, "C": 10.0 * i}
            aligned = {"A": 3.0 * i + seed, "B": -3.0 * i + seed, "C": 5.0}
            for d in dims:
                r[f"err_{d}"] = abs(aligned[d] - target[d])
                r[f"target_{d}"], r[f"naive_{d}"], r[f"icl_{d}"], r[f"aligned_{d}"] = target[d], 7.0, target[d] + 1, aligned[d]
            rows.append(r)
    return rows


def test_kendall_tau_on_a_crafted_grid():
    tau = kendall(crafted(4))
    assert tau["A"]["de"]["tau"] == pytest.approx(1.0) and tau["A"]["de"]["n"] == 4
    assert tau["B"]["de"]["tau"] == pytest.approx(-1.0)
    assert tau["C"]["de"]["tau"] is None and "no variation" in tau["C"]["de"]["note"]
    assert tau["A"]["naive"]["tau"] is None and "no variation" in tau["A"]["naive"]["note"]  # same for every target
    assert tau["A"]["icl"]["tau"] == pytest.approx(1.0)
    assert 0 < tau["A"]["de"]["p"] < 0.1
    few = kendall(crafted(2))
    assert few["A"]["de"]["tau"] is None and few["A"]["de"]["note"] == "n/a: 2 target(s)"


def test_report_tables_on_crafted_rows():
    rows = crafted(3)
    text = build_report(rows, ["# crafted"], {})
    assert "| A | n/a" not in text and "| A | undefined (no variation) | +1.00" in text
    assert "| Target 0 | s | 100.0 | 90.0 | 40.5 ± 0.7 |" in text  # mean ± sample std over the two seeds
    assert "| Target 0 | s | de | 1/2 | 6 | 0.5 |" in text  # one of two seeds reached half the naive L1
    errs = dimension_errors(rows)
    assert list(errs) == ["A", "B", "C"]  # the dimensions come from the rows, not a fixed list
    assert errs["C"]["naive"] == pytest.approx((3 + 7 + 13) / 3)
    two = build_report(crafted(2), ["# crafted"], {})
    assert "Not computed: the grid has 2 target(s) with results; Kendall τ needs at least 3." in two


def test_the_heldout_section_is_reserved():
    from culturalign.experiments import report

    assert report._heldout_section(crafted(3)) == ""


# ---- the command line -----------------------------------------------------------------------------------------------

def test_cli_dry_run_prints_the_cells_and_writes_nothing(tmp_path, tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "g.yaml", SMALL.format(budget=12))
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert run(["experiment", "g.yaml", "--model", str(tiny_dir), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "CN-hofstede-2015-de-s0" in printed and "US-hofstede-2015-de-s0" in printed and "new" in printed
    assert "runs/experiments/g" in printed
    assert snapshot(tmp_path) == before


def test_cli_runs_a_grid(tmp_path, tiny_dir, capsys):
    spec = write(tmp_path, "g.yaml", SMALL.format(budget=12).replace("[CN, US]", "[CN]"))
    capsys.readouterr()
    code = run(["experiment", str(spec), "--model", str(tiny_dir), "--out", str(tmp_path / "o")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "| China | hofstede-2015 |" in captured.out and "1 cell(s) run" in captured.err
    assert read_csv(tmp_path / "o" / "cells.csv")[0]["status"] == "finished"
    stored = json.loads((tmp_path / "o" / SPEC_FILE).read_text())["spec"]
    assert stored["model"] == str(tiny_dir)  # --model overrides the file's
    capsys.readouterr()
    assert run(["experiment", str(spec), "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "done (12 evaluations)" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--executor", "dask"], "--executor 'dask'"),
    (["--address", "auto"], "--address applies to --executor ray only"),
    (["--executor", "ray", "--num-cpus", "0"], "--num-cpus must be at least 1"),
    (["--executor", "ray", "--cell-timeout", "0"], "--cell-timeout"),
    (["--executor", "ray", "--num-cpus", "2", "--address", "auto"], "cannot be given with --address"),
    (["--device", "tpu"], "'tpu'"),
    (["--executor", "ray", "--model", "/nope/model"], "model directory '/nope/model' does not exist"),  # before Ray starts
])
def test_cli_executor_options(argv, needle, tmp_path, capsys):
    spec = write(tmp_path, "g.yaml", SMALL.format(budget=12))
    before = snapshot(tmp_path)
    line = one_line_error(["experiment", str(spec), "--out", str(tmp_path / "o"), *argv], capsys)
    assert needle in line, line
    assert snapshot(tmp_path) == before


def test_ray_stays_optional(monkeypatch, tmp_path):
    import importlib.util
    import subprocess
    import sys

    src = Path(__file__).resolve().parents[1] / "src"
    code = ("import sys, culturalign.cli, culturalign.experiments, culturalign.experiments.executors, "
            "culturalign.experiments.report; assert 'ray' not in sys.modules, 'ray imported'")
    import os

    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(CulturalignError, match=r"--executor ray needs Ray: pip install 'culturalign\[ray\]'"):
        make_executor("ray")


# ---- Ray: the bounded loop on a fake, then one real local cluster --------------------------------------------------

class FakeRay:
    """Enough of Ray for `RayExecutor.run`: tasks that finish instantly, or never (to hit the timeout)."""

    def __init__(self, hang: set[str]):
        self.hang, self.submitted, self.cancelled, self.in_flight_max, self.live = hang, [], [], 0, set()

    def remote(self, fn):
        fake = self

        class Remote:
            def options(self, **kw):
                fake.options = kw
                return self

            def remote(self, model, device, inst, target, config, out, resume):
                ref = (Path(out).name, len(fake.submitted))
                fake.submitted.append(ref)
                fake.live.add(ref)
                fake.in_flight_max = max(fake.in_flight_max, len(fake.live))
                return ref
        return Remote()

    def wait(self, refs, num_returns, timeout):
        ready = [r for r in refs if r[0] not in self.hang][:num_returns]
        return ready, [r for r in refs if r not in ready]

    def get(self, ref):
        self.live.discard(ref)
        return {"status": "finished", "result": None}

    def cancel(self, ref, force):
        self.live.discard(ref)
        self.cancelled.append(ref[0])


def test_ray_loop_bounds_tasks_and_times_out(tmp_path):
    exp = load_spec(write(tmp_path, "g.yaml", SMALL.format(budget=12).replace("[CN, US]", "[CN, US, JP, DE]")))
    states = plan(exp, tmp_path / "o")
    ex = RayExecutor(cell_timeout=0.05, poll_seconds=0.01)
    ex.ray, ex.slots, ex.gpus = FakeRay(hang={"US-hofstede-2015-de-s0"}), 2, 1
    finished = []
    ex.run(exp, states, lambda kind, s, info: kind == "finish" and finished.append((s.cell.name, info["status"])))
    assert ex.ray.in_flight_max <= 2 and ex.ray.options["num_gpus"] == 1  # a GPU per cell when the cluster has one
    assert ex.ray.cancelled == ["US-hofstede-2015-de-s0"]
    assert sorted(finished) == sorted([("CN-hofstede-2015-de-s0", "finished"), ("US-hofstede-2015-de-s0", "timeout"),
                                       ("JP-hofstede-2015-de-s0", "finished"), ("DE-hofstede-2015-de-s0", "finished")])
    assert "--cell-timeout" in states[1].outcome["error"]


def test_ray_local_cluster_runs_the_grid_like_local(tiny_dir, tmp_path):
    """2 cells as Ray tasks on a local 2-CPU cluster (bounded: 240 s per cell), compared with the same grid run here."""
    pytest.importorskip("ray")
    text = SMALL.format(budget=12).replace("[CN, US]", "[CN]").replace("[de]", "[de, adam]").replace(
        "model: tiny", f"model: {tiny_dir}") + "optimizer_settings: {adam: {budget: 2, lr: 0.1}}\n"
    exp = load_spec(write(tmp_path, "g.yaml", text))
    ex = RayExecutor(num_cpus=2, cell_timeout=240, init_options={"object_store_memory": 100 * 1024 ** 2})
    result = run_experiment(exp, tmp_path / "ray", ex)
    import ray

    assert not ray.is_initialized()  # the local cluster was shut down
    assert [r["status"] for r in result.rows] == ["finished", "finished"] and ex.slots == 2
    local = run_experiment(load_spec(tmp_path / "g.yaml"), tmp_path / "local", LocalExecutor())
    assert without_timing(result.rows) == without_timing(local.rows)
    for c in exp.cells:
        assert (tmp_path / "ray" / CELLS_DIR / c.name / "result.json").is_file()
    assert math.isfinite(result.rows[0]["aligned_l1"])


# ---- held-out checks of the cells ----------------------------------------------------------------------------

def test_heldout_checks_join_the_csv_and_the_report(grid_run, tiny_lm, tmp_path):
    """`--heldout` runs the held-out checks once per finished cell, adds them to cells.csv and report.md, and a
    second pass finds nothing to do."""
    import shutil

    from culturalign.experiments.runner import HELDOUT_FILE, plan, run_heldout_cells

    exp, out, _, _ = grid_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    states = plan(exp, copy)
    seen = []
    n = run_heldout_cells(exp, copy, states, tiny_lm, on_cell=lambda s, i, k: seen.append((s.cell.name, i, k)))
    assert n == len(exp.cells) == len(seen)
    rows = read_csv(copy / "cells.csv")
    for r in rows:
        held = json.loads((copy / "cells" / r["cell"] / HELDOUT_FILE).read_text())
        base = held["survey"]["original"]
        assert float(r["heldout_l1_with"]) == pytest.approx(base["with"]["l1"])
        # the held-out "with" profile on the original items is the cell's aligned profile
        assert float(r["heldout_l1_with"]) == pytest.approx(float(r["aligned_l1"]), abs=1e-3)
        kinds = {v["kind"] for v in held["survey"]["variants"]}
        assert kinds == {"paraphrase", "reversed options"}
        for col in ("heldout_mcq_with", "heldout_ppl_with"):
            assert r[col] != "", col
        for col in ("heldout_para_a_kept", "heldout_para_b_kept", "heldout_reversed_kept"):
            assert (r[col] != "") == (base["gain"] > 0), col  # the share is undefined without a gain
    report = (copy / "report.md").read_text()
    assert "## Held-out checks" in report and all(r["cell"] in report.split("## Held-out checks")[1] for r in rows)
    assert run_heldout_cells(exp, copy, plan(exp, copy), tiny_lm) == 0
