"""Run an experiment grid: check the output folder, run the cells that are not finished, write the tables.

The experiment folder:

    experiment.json     the normalised file (targets resolved, every cell's full settings), written once the
                        model (or the cluster) is ready; a rerun with a changed file is refused, except a budget
                        that grows (the finished cells are then extended)
    cells/<COUNTRY>-<set>-<optimizer>-s<seed>/   an ordinary `align` output folder per cell
    cells.csv           one row per cell (tidy): L1s, ratio, per-dimension errors and scores, time to half naive,
                        the uniform floor, and the aligned profile's L1 to every grid target (specificity)
    curves.csv          best L1 against evaluations and seconds, per cell
    report.md, plots/   the tables and convergence plots (see `report.py`)

A finished cell (checkpoint marked finished with the cell's budget, and its result.json) is skipped;
an interrupted one resumes from its checkpoint (`Aligner(..., resume=True)`), so a grid can be stopped
at any point and continued by running the same command again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from culturalign.errors import CulturalignError
from culturalign.experiments.spec import Cell, Experiment

SCHEMA = "culturalign.experiment/1"
SPEC_FILE = "experiment.json"
CELLS_DIR = "cells"
# Events sent to `progress(kind, cell, info)`: "start" (info: evaluations done, budget), "progress" (the
# Aligner's per-generation info: evaluations, best_loss, budget), "finish" (info: status, error).
Progress = Callable[[str, "CellState", dict], None]


@dataclass
class CellState:
    cell: Cell
    out: Path
    status: str  # new | partial (interrupted) | extend (finished with a smaller budget) | done
    evaluations: int = 0
    outcome: dict = field(default_factory=dict)  # after a run: status (finished/failed/timeout), error, result

    @property
    def resume(self) -> bool:
        return self.status in ("partial", "extend")


# ---- before anything runs: the output folder and the stored spec ---------------------------------------

def _cell_state(cell: Cell, folder: Path) -> CellState:
    from culturalign.alignment.run import inspect_out

    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return CellState(cell, folder, "new")
    try:
        state = inspect_out(folder, resume=True)
    except CulturalignError as e:
        raise CulturalignError(f"cell {cell.name}: {e}") from None
    done = int(state["history"][-1]["evaluations"])
    if state.get("finished") and state["budget"] >= cell.budget:
        if not (folder / "result.json").is_file():
            raise CulturalignError(f"cell {cell.name}: its checkpoint is finished but result.json is missing; "
                                   f"delete {str(folder)!r} to run the cell again")
        return CellState(cell, folder, "done", done)
    return CellState(cell, folder, "extend" if state.get("finished") else "partial", done)


def _without_budgets(spec: dict) -> dict:
    s = json.loads(json.dumps(spec))
    s.pop("name", None)
    for cfg in [*s.get("cells", {}).values(), *s.get("optimizer_settings", {}).values()]:
        cfg.pop("budget", None)
    return s


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            p = f"{prefix}.{k}" if prefix else str(k)
            if k not in old or k not in new:
                out.append(p)
            else:
                out += _diff(old[k], new[k], p)
        return out
    return [] if old == new else [prefix]


def changed_keys(old: dict, new: dict) -> list[str]:
    """What differs between two normalised specs (budgets aside), as the file's keys. A cell setting that
    changed with no key of the file changing (a default of another culturalign version) is named too."""
    old, new = _without_budgets(old), _without_budgets(new)
    out = [p for p in _diff({k: v for k, v in old.items() if k != "cells"}, {k: v for k, v in new.items() if k != "cells"})]
    fields = []
    for p in _diff(old.get("cells", {}), new.get("cells", {})):
        parts = p.split(".", 1)
        if len(parts) == 2 and parts[1] not in fields and not any(q.endswith("." + parts[1]) for q in out):
            fields.append(parts[1])
    if fields:
        out.append(f"the cells' {', '.join(fields)} (a default of another culturalign version?)")
    if not out and old != new:
        out.append("the grid's cells")
    return out


def read_stored_spec(out: Path) -> dict:
    from culturalign.files import read_json_file

    path = out / SPEC_FILE
    data = read_json_file(path, "experiment record")
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("spec"), dict):
        raise CulturalignError(f"{str(path)!r} is not a culturalign experiment record ({SCHEMA}); "
                               "choose another --out or delete it")
    return data["spec"]


def plan(exp: Experiment, out: str | Path) -> list[CellState]:
    """Check the experiment folder against `exp` and say what each cell needs; nothing is written.

    Refused with one line: an output path that cannot be a folder, a folder that is not empty and holds no
    experiment, a damaged cell, or (once any cell has started) a file that changed since the folder was
    started, other than a budget that grows.
    """
    from culturalign.files import check_output_dir

    out = Path(out)
    check_output_dir(out, "--out")
    stored = None
    if (out / SPEC_FILE).exists():
        stored = read_stored_spec(out)
    elif out.is_dir() and any(p.name != CELLS_DIR for p in out.iterdir()):
        raise CulturalignError(f"--out {str(out)!r} is not empty and holds no culturalign experiment; "
                               "choose a new or empty folder")
    states = [_cell_state(c, out / CELLS_DIR / c.name) for c in exp.cells]
    started = [s for s in states if s.status != "new"]
    if started:
        where = str(exp.path)
        if stored is None:
            raise CulturalignError(f"--out {str(out)!r} holds cells but no {SPEC_FILE}; it cannot be checked against "
                                   f"{where}: choose another --out")
        new = exp.normalised()
        changed = changed_keys(stored, new)
        if changed:
            raise CulturalignError(
                f"{where} has changed since the experiment in {str(out)!r} was started (changed: {', '.join(changed)}); "
                "restore it, or choose another --out for the new grid (only a larger budget can extend a started experiment)")
        for s in started:
            old = stored["cells"][s.cell.name]["budget"]
            if s.cell.budget < old:
                key = (f"optimizer_settings.{s.cell.optimizer}.budget"
                       if "budget" in exp.optimizer_settings.get(s.cell.optimizer, {}) else "grid.budget")
                raise CulturalignError(
                    f"{where}: {key}: {s.cell.budget} is below the {old} evaluations cell {s.cell.name} was run with; "
                    "a started experiment's budget can only grow")
    return states


def write_spec(exp: Experiment, out: Path) -> None:
    """experiment.json, rewritten only when it changes (first run, or a budget that grew)."""
    from culturalign import __version__
    from culturalign.files import atomic_write_json

    spec = exp.normalised()
    path = out / SPEC_FILE
    if path.exists():
        try:
            if read_stored_spec(out) == spec:
                return
        except CulturalignError:
            pass
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"schema": SCHEMA, "culturalign_version": __version__, "source": str(exp.path), "spec": spec})


# ---- after the cells ran: tidy rows ---------------------------------------------------------------------

def _best_l1(entry: dict) -> float:
    return float(entry["best_l1"] if entry.get("best_l1") is not None else entry["best_loss"])


def target_key(target) -> str:
    """A grid target's name in cells.csv's cross-target columns (`l1_to_<key>`): its folder prefix, CODE-set."""
    from culturalign.experiments.spec import _code

    return f"{_code(target)}-{target.set_name}"


def cross_target(indices: dict[str, float], targets: list) -> dict[str, float | None]:
    """{target_key: L1 of `indices` to that target} over each target's published dimensions (arithmetic, no model)."""
    from culturalign.measure.targets import l1

    return {target_key(t): l1(indices, t)[0] for t in targets}


def _floor(result: dict, target, instrument) -> dict | None:
    """The cell's uniform profile: result.json's own, or (a run written before it was recorded) computed from the
    instrument and the run's constants."""
    u = result["profiles"].get("uniform")
    if u is None and instrument is not None:
        from culturalign.measure.survey import uniform_result

        u = uniform_result(instrument, target, result["settings"]["constants"]).to_json()
    return u


def cell_rows(state: CellState, result: dict | None, dims: list[str], instrument=None,
              grid_targets: list | None = None) -> tuple[dict, list[dict]]:
    """The cell's row of cells.csv and its rows of curves.csv (None values are empty cells).

    `instrument` gives the uniform floor of a result.json that lacks it; `grid_targets` (every target of the
    grid) the cross-target columns: the aligned profile's L1 to each, the own target's rank among them and
    the specificity (see `experiments.report.rank_and_specificity`)."""
    from culturalign.experiments.report import floor_columns, rank_and_specificity

    grid_targets = list(grid_targets or [])
    c = state.cell
    row = {"cell": c.name, "country": c.target.name, "code": c.code, "set": c.set_name, "optimizer": c.optimizer,
           "seed": c.seed, "budget": c.budget}
    status = state.outcome.get("status", "finished" if result is not None else "missing")
    empty = {k: None for k in ("evaluations", "naive_l1", "icl_l1", "aligned_l1", "ratio")}
    if result is None:
        row.update(empty)
        row.update({f"err_{d}": None for d in dims})
        row.update({"search_seconds": None, "evals_to_half_naive": None, "seconds_to_half_naive": None,
                    "status": status, "error": state.outcome.get("error")})
        row.update({f"{p}_{d}": None for p in ("target", "naive", "icl", "aligned") for d in dims})
        row["aligned_option_mass"] = None
        row.update(floor_columns([target_key(t) for t in grid_targets]))
        return row, []
    try:
        prof = result["profiles"]
        naive, icl, aligned = prof["naive"], prof["icl"], prof["aligned"]
        history = result["history"]
        scores = c.target.scores
        row.update({"evaluations": int(result["evaluations"]), "naive_l1": naive["l1"], "icl_l1": icl["l1"],
                    "aligned_l1": aligned["l1"],
                    "ratio": aligned["l1"] / naive["l1"] if naive["l1"] else None})
        row.update({f"err_{d}": abs(aligned["indices"][d] - scores[d]) if d in scores and d in aligned["indices"] else None
                    for d in dims})
        half = naive["l1"] / 2 if naive["l1"] is not None else None
        hit = next((h for h in history if half is not None and _best_l1(h) <= half), None)
        row.update({"search_seconds": result.get("search_seconds"),
                    "evals_to_half_naive": None if hit is None else int(hit["evaluations"]),
                    "seconds_to_half_naive": None if hit is None else hit.get("seconds"),
                    "status": status, "error": state.outcome.get("error")})
        row.update({f"target_{d}": scores.get(d) for d in dims})
        for name, p in (("naive", naive), ("icl", icl), ("aligned", aligned)):
            row.update({f"{name}_{d}": p["indices"].get(d) for d in dims})
        row["aligned_option_mass"] = aligned.get("mean_option_mass")
        row.update(floor_columns([target_key(t) for t in grid_targets]))
        floor = _floor(result, c.target, instrument)
        if floor is not None:
            row["uniform_l1"] = floor["l1"]
            row["ratio_uniform"] = aligned["l1"] / floor["l1"] if floor["l1"] else None
        if grid_targets:
            l1s = cross_target(aligned["indices"], grid_targets)
            row.update({f"l1_to_{k}": v for k, v in l1s.items()})
            row["own_rank"], row["specificity"] = rank_and_specificity(target_key(c.target), l1s)
        curves = [{"cell": c.name, "code": c.code, "set": c.set_name, "optimizer": c.optimizer, "seed": c.seed,
                   "evaluations": int(h["evaluations"]), "best_l1": _best_l1(h), "seconds": h.get("seconds")}
                  for h in history]
    except (KeyError, TypeError, IndexError, ZeroDivisionError) as e:
        raise CulturalignError(f"cell {c.name}: result.json is damaged ({e!r}); delete {str(state.out)!r} to run it again") from None
    return row, curves


HELDOUT_FILE = "heldout.json"


def collect(states: list[CellState], dims: list[str], instrument=None, grid_targets: list | None = None
            ) -> tuple[list[dict], list[dict]]:
    from culturalign.experiments.report import heldout_columns
    from culturalign.files import read_json_file

    rows, curves = [], []
    for s in states:
        result = s.outcome.get("result")
        if result is None and s.outcome.get("status", "finished") == "finished" and (s.out / "result.json").is_file():
            result = read_json_file(s.out / "result.json", f"cell {s.cell.name} result")
        row, curve = cell_rows(s, result, dims, instrument, grid_targets)
        held = s.out / HELDOUT_FILE
        row.update(heldout_columns(read_json_file(held, f"cell {s.cell.name} held-out checks")
                                   if result is not None and held.is_file() else None))
        rows.append(row)
        curves += curve
    return rows, curves


# ---- the whole experiment -------------------------------------------------------------------------------

@dataclass
class ExperimentResult:
    out: Path
    states: list[CellState]
    rows: list[dict]
    curves: list[dict]
    ran: int  # cells run (or continued) now

    @property
    def failed(self) -> list[CellState]:
        return [s for s in self.states if s.outcome.get("status") not in (None, "finished")]


def run_experiment(exp: Experiment, out: str | Path, executor, progress: Progress | None = None,
                   states: list[CellState] | None = None) -> ExperimentResult:
    """Run the cells that are not finished with `executor`, then write cells.csv, curves.csv and the report.

    `executor` opens (loads the model, or joins a cluster) only when some cell has work to do; the
    experiment folder is written only after that. A cell that fails (or times out on Ray) is recorded with
    its status in cells.csv, and the run then ends with one error naming it; rerun to retry it.
    """
    from culturalign.experiments.report import write_outputs

    out = Path(out)
    states = plan(exp, out) if states is None else states
    progress = progress or (lambda kind, state, info: None)
    todo = [s for s in states if s.status != "done"]
    if todo:
        with executor.open(exp, todo):
            write_spec(exp, out)
            executor.run(exp, todo, progress)
    else:
        write_spec(exp, out)
    for s in states:
        if s.status == "done":
            s.outcome.setdefault("status", "finished")
    rows, curves = collect(states, exp.dims, exp.instrument, exp.targets)
    write_outputs(out, exp, rows, curves)
    result = ExperimentResult(out, states, rows, curves, len(todo))
    if result.failed:
        first = result.failed[0]
        raise CulturalignError(
            f"{len(result.failed)} of {len(states)} cells did not finish (first: {first.cell.name}, "
            f"{first.outcome.get('status')}: {first.outcome.get('error')}); the others are in {str(out / 'cells.csv')!r}. "
            "Rerun the same command to retry them")
    return result


def run_heldout_cells(exp: Experiment, out: str | Path, states: list[CellState], backend,
                      on_cell: Callable[[CellState, int, int], None] | None = None) -> int:
    """Held-out checks (`culturalign heldout`) of every finished cell that has none yet, written to
    cells/<cell>/heldout.json; then cells.csv and report.md are rewritten with them. Returns how many ran."""
    from culturalign.experiments.report import write_outputs
    from culturalign.files import atomic_write_json
    from culturalign.heldout.checks import run_heldout
    from culturalign.softprompt.prompt import SoftPrompt

    todo = [s for s in states if (s.out / "result.json").is_file() and not (s.out / HELDOUT_FILE).is_file()]
    for i, s in enumerate(todo):
        if on_cell is not None:
            on_cell(s, i, len(todo))
        cfg = s.cell.config
        sp = SoftPrompt.load(s.out, backend.hidden_size)
        result = run_heldout(backend, sp, s.cell.target, prompt=cfg.prompt, constants=cfg.constants,
                             instrument=exp.instrument.source or exp.instrument.id, order=cfg.order)
        atomic_write_json(s.out / HELDOUT_FILE, result)
    for s in states:
        if (s.out / "result.json").is_file():
            s.outcome.setdefault("status", "finished")
    rows, curves = collect(states, exp.dims, exp.instrument, exp.targets)
    write_outputs(Path(out), exp, rows, curves)
    return len(todo)
