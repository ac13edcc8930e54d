"""An experiment's tables and plots: cells.csv, curves.csv, plots/convergence-*.png and report.md.

Everything here is computed from the tidy rows (`runner.cell_rows`), so the report can be rebuilt from
the CSVs alone, and tested on crafted rows. The dimensions come from the rows' columns (the
instrument's indices), never from a fixed list.

- L1 per method and target: naive and icl (one value: the model is deterministic), and each optimizer's
  aligned L1 as mean ± sample std over seeds.
- Convergence per target: per optimizer the median best L1 over seeds against evaluations, with the
  min-max band, and a dashed line at half the naive L1.
- Evaluations and seconds to reach half the naive L1: the median over the seeds that reached it.
- Per-dimension absolute error |score - target|: mean over the targets (and seeds) that publish it.
- Kendall tau per dimension across the grid's targets (as in the Cultural Alignment Test): does a method's
  profile rank the targets as their published scores do? Needs 3 or more targets with that dimension.
  The naive profile is the same for every target, so its tau is undefined (said so, not hidden).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

CURVE_COLUMNS = ["cell", "code", "set", "optimizer", "seed", "evaluations", "best_l1", "seconds"]
BASELINES = ("naive", "icl")


def fmt(x, nd: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="raise")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (repr(r[k]) if isinstance(r[k], float) else r[k])) for k in columns})
    return buf.getvalue()


def dims_of(rows: list[dict]) -> list[str]:
    """The instrument's dimensions, read from the err_<DIM> columns in order."""
    return [k[4:] for k in rows[0] if k.startswith("err_")] if rows else []


def _finished(rows):
    return [r for r in rows if r.get("status") == "finished" and r.get("aligned_l1") is not None]


def _targets(rows) -> list[tuple[str, str]]:
    seen = []
    for r in rows:
        if (r["code"], r["set"]) not in seen:
            seen.append((r["code"], r["set"]))
    return seen


def _optimizers(rows) -> list[str]:
    return list(dict.fromkeys(r["optimizer"] for r in rows))


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _name(rows, key) -> str:
    return next(r["country"] for r in rows if (r["code"], r["set"]) == key)


# ---- tables ---------------------------------------------------------------------------------------------

def l1_table(rows: list[dict]) -> list[str]:
    done, opts = _finished(rows), _optimizers(rows)
    lines = ["| target | set | naive | icl | " + " | ".join(opts) + " |",
             "|---|---|---:|---:|" + "---:|" * len(opts)]
    for key in _targets(rows):
        mine = [r for r in done if (r["code"], r["set"]) == key]
        cells = [fmt(statistics.mean([r[f"{b}_l1"] for r in mine])) if mine else "-" for b in BASELINES]
        cells += [_mean_std([r["aligned_l1"] for r in mine if r["optimizer"] == o]) for o in opts]
        lines.append(f"| {_name(rows, key)} | {key[1]} | " + " | ".join(cells) + " |")
    icl = [r["icl_l1"] / r["naive_l1"] for r in done if r["naive_l1"]]
    lines.append("| **aligned / naive**, all targets | | 1.00 | " + (f"{statistics.mean(icl):.2f}" if icl else "-") + " | "
                 + " | ".join(_ratio(done, o) for o in opts) + " |")
    return lines


def _ratio(done, opt) -> str:
    vals = [r["ratio"] for r in done if r["optimizer"] == opt and r["ratio"] is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.2f}"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"


def half_naive_table(rows: list[dict]) -> list[str]:
    done = _finished(rows)
    lines = ["| target | set | optimizer | seeds reaching ½ naive | median evaluations | median seconds |",
             "|---|---|---|---:|---:|---:|"]
    for key in _targets(rows):
        for o in _optimizers(rows):
            mine = [r for r in done if (r["code"], r["set"]) == key and r["optimizer"] == o]
            if not mine:
                continue
            hit = [r for r in mine if r["evals_to_half_naive"] is not None]
            ev = statistics.median([r["evals_to_half_naive"] for r in hit]) if hit else None
            secs = [r["seconds_to_half_naive"] for r in hit if r["seconds_to_half_naive"] is not None]
            lines.append(f"| {_name(rows, key)} | {key[1]} | {o} | {len(hit)}/{len(mine)} | {fmt(ev, 0)} | "
                         f"{fmt(statistics.median(secs)) if secs else '-'} |")
    return lines


def _methods(rows) -> list[str]:
    return list(BASELINES) + _optimizers(rows)


def _profile_rows(done, method):
    """(rows, score prefix) whose `<prefix>_<DIM>` columns hold `method`'s index scores."""
    if method in BASELINES:
        return done, method
    return [r for r in done if r["optimizer"] == method], "aligned"


def dimension_errors(rows: list[dict]) -> dict[str, dict[str, float | None]]:
    """{dim: {method: mean |score - target|}} over finished cells whose target publishes the dimension.

    A baseline counts once per target (it does not depend on the optimizer or seed)."""
    done, out = _finished(rows), {}
    for d in dims_of(rows):
        out[d] = {}
        for m in _methods(rows):
            sel, prefix = _profile_rows(done, m)
            if m in BASELINES:
                sel = [next(r for r in sel if (r["code"], r["set"]) == k) for k in _targets(sel)]
            errs = [abs(r[f"{prefix}_{d}"] - r[f"target_{d}"]) for r in sel
                    if r.get(f"target_{d}") is not None and r.get(f"{prefix}_{d}") is not None]
            out[d][m] = statistics.mean(errs) if errs else None
    return out


def kendall(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{dim: {method: {"tau", "p", "n", "note"}}}: Kendall tau (tau-b) across targets between a method's index
    scores (aligned: the mean over seeds) and the targets' published scores, per dimension."""
    from scipy.stats import kendalltau

    done, out = _finished(rows), {}
    for d in dims_of(rows):
        out[d] = {}
        for m in _methods(rows):
            sel, prefix = _profile_rows(done, m)
            xs, ys = [], []
            for key in _targets(sel):
                mine = [r for r in sel if (r["code"], r["set"]) == key and r.get(f"target_{d}") is not None
                        and r.get(f"{prefix}_{d}") is not None]
                if mine:
                    xs.append(statistics.mean(r[f"{prefix}_{d}"] for r in mine))
                    ys.append(mine[0][f"target_{d}"])
            entry = {"tau": None, "p": None, "n": len(xs), "note": ""}
            if len(xs) < 3:
                entry["note"] = f"n/a: {len(xs)} target(s)"
            elif max(xs) - min(xs) < 1e-9:
                entry["note"] = "undefined (no variation)"
            elif max(ys) - min(ys) < 1e-9:
                entry["note"] = "undefined (targets tie)"
            else:
                res = kendalltau(xs, ys)
                entry["tau"], entry["p"] = float(res.statistic), float(res.pvalue)
            out[d][m] = entry
    return out


def _tau_cell(e: dict) -> str:
    if e["tau"] is None:
        return e["note"]
    return f"{e['tau']:+.2f} (p {e['p']:.2f})"


# ---- plots ------------------------------------------------------------------------------------------------

def _step(curve: list[tuple[int, float]], xs: list[int]) -> list[float]:
    """Best-so-far L1 at each x (the last point at or before x); NaN before the first point."""
    out, j, last = [], 0, float("nan")
    for x in xs:
        while j < len(curve) and curve[j][0] <= x:
            last = curve[j][1]
            j += 1
        out.append(last)
    return out


def convergence_plot(path: Path, title: str, curves_by_opt: dict[str, list[list[tuple[int, float]]]],
                     naive_l1: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from culturalign.files import atomic_write

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for opt, curves in curves_by_opt.items():
        curves = [sorted(c) for c in curves if c]
        if not curves:
            continue
        xs = sorted({x for c in curves for x, _ in c})
        ys = np.array([_step(c, xs) for c in curves], dtype=float)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                med, lo, hi = np.nanmedian(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
        line, = ax.plot(xs, med, drawstyle="steps-post", marker="o", markersize=2.5, label=f"{opt} (median of {len(curves)})")
        if len(curves) > 1:
            ax.fill_between(xs, lo, hi, step="post", alpha=0.2, color=line.get_color())
    if naive_l1 is not None:
        ax.axhline(naive_l1, color="tab:gray", linestyle=":", label=f"naive L1 ({naive_l1:.1f})")
        ax.axhline(naive_l1 / 2, color="black", linestyle="--", label=f"½ naive ({naive_l1 / 2:.1f})")
    ax.set_xlabel("candidate evaluations (full surveys)")
    ax.set_ylabel("best L1 to target")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_name(code: str, set_name: str) -> str:
    return f"convergence-{code}-{set_name}.png"


def convergence_plots(folder: Path, rows: list[dict], curves: list[dict]) -> dict[tuple[str, str], str]:
    """One plot per target; returns {(code, set): path relative to the experiment folder}."""
    folder.mkdir(parents=True, exist_ok=True)
    done = _finished(rows)
    paths = {}
    for key in _targets(done):
        mine = [r for r in done if (r["code"], r["set"]) == key]
        by_opt: dict[str, list] = {}
        for r in mine:
            pts = [(c["evaluations"], c["best_l1"]) for c in curves if c["cell"] == r["cell"]]
            by_opt.setdefault(r["optimizer"], []).append(pts)
        name = plot_name(*key)
        convergence_plot(folder / name, f"{mine[0]['country']} ({key[1]})", by_opt, mine[0]["naive_l1"])
        paths[key] = f"{folder.name}/{name}"
    return paths


# ---- report.md ----------------------------------------------------------------------------------------------

def _heldout_section(cells: list[dict]) -> str:
    """Held-out checks of the cells' soft prompts (`--heldout`): paraphrases, reversed options, MCQ, perplexity."""
    rows = [r for r in cells if r.get("heldout_l1_with") is not None]
    if not rows:
        return ""

    def f(x, nd):
        return "-" if x is None else f"{x:.{nd}f}"

    lines = ["## Held-out checks", "",
             "Each finished cell's soft prompt on material it was not tuned on (`culturalign heldout`). *kept* is the "
             "share of the L1 gain on the original items that carries over to a variant: (L1 without - L1 with) on "
             "the variant / the same on the original; 1 = all of it, 0 = none. MCQ: accuracy on the shipped "
             "cultural-knowledge questions. Perplexity: a neutral text, without and with the prompt.", "",
             "| cell | L1 without | L1 with | kept, para-a | kept, para-b | kept, reversed options | MCQ without | "
             "MCQ with | perplexity without | perplexity with |",
             "|---|" + "---:|" * 9]
    for r in rows:
        lines.append(f"| {r['cell']} | {f(r['heldout_l1_without'], 1)} | {f(r['heldout_l1_with'], 1)} | "
                     f"{f(r['heldout_para_a_kept'], 2)} | {f(r['heldout_para_b_kept'], 2)} | "
                     f"{f(r['heldout_reversed_kept'], 2)} | {f(r['heldout_mcq_without'], 3)} | "
                     f"{f(r['heldout_mcq_with'], 3)} | {f(r['heldout_ppl_without'], 2)} | {f(r['heldout_ppl_with'], 2)} |")
    return "\n".join(lines) + "\n"


def build_report(rows: list[dict], header: list[str], plots: dict[tuple[str, str], str]) -> str:
    dims, opts, done = dims_of(rows), _optimizers(rows), _finished(rows)
    methods = _methods(rows)
    lines = list(header)
    lines += ["", "## L1 to the target", "",
              "Lower is better. naive and icl are the model without a soft prompt (one value per target); each optimizer's "
              "column is the aligned profile's L1, mean ± sample std over seeds.", ""]
    lines += l1_table(rows)
    lines += ["", "## Convergence", "",
              "Best L1 against candidate evaluations: the median over seeds, with the min-max band; the dashed line is half "
              "the naive L1. A search that records no `best_l1` is drawn with its `best_loss` (L1 plus the option-mass "
              "penalty), as are the times to ½ naive below.", ""]
    for key, path in plots.items():
        lines += [f"![{_name(rows, key)} ({key[1]})]({path})", ""]
    lines += ["## Evaluations and seconds to reach ½ naive L1", "",
              "Median over the seeds that reached it (best L1 at or below half the naive L1); seconds of search.", ""]
    lines += half_naive_table(rows)
    errs = dimension_errors(rows)
    lines += ["", "## Per-dimension absolute error", "",
              "Mean |index score - target score| over the targets (and seeds) that publish the dimension.", "",
              "| dimension | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for d in dims:
        lines.append(f"| {d} | " + " | ".join(fmt(errs[d][m]) for m in methods) + " |")
    n_targets = len(_targets(done))
    lines += ["", "## Kendall τ across targets, per dimension", "",
              "As in the Cultural Alignment Test: does a method's profile rank the targets as their published scores do? "
              "τ-b between the method's index scores (aligned: mean over seeds) and the target scores, with its p-value. "
              "The naive profile does not depend on the target, so its τ is undefined.", ""]
    if n_targets < 3:
        lines.append(f"Not computed: the grid has {n_targets} target(s) with results; Kendall τ needs at least 3.")
    else:
        tau = kendall(rows)
        lines += ["| dimension | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
        for d in dims:
            lines.append(f"| {d} | " + " | ".join(_tau_cell(tau[d][m]) for m in methods) + " |")
    held = _heldout_section(rows)
    if held:
        lines += ["", held.rstrip()]
    bad = [r for r in rows if r.get("status") != "finished"]
    if bad:
        lines += ["", "## Cells that did not finish", ""]
        lines += [f"- {r['cell']}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "") for r in bad]
    lines += ["", "Data: `cells.csv` (one row per cell) and `curves.csv` (best L1 per generation); each cell's own "
              "outputs are in `cells/<cell>/`.", ""]
    return "\n".join(lines)


def _header(exp, rows) -> list[str]:
    done = _finished(rows)
    budgets = sorted({r["budget"] for r in rows})
    return [f"# Experiment {exp.name}", "",
            f"Model {exp.model}, instrument {exp.instrument.id}; {len(exp.targets)} target(s) × {len(exp.optimizers)} "
            f"optimizer(s) ({', '.join(exp.optimizers)}) × {len(exp.seeds)} seed(s) ({', '.join(map(str, exp.seeds))}) = "
            f"{len(rows)} cells, {len(done)} finished; budget {', '.join(map(str, budgets))} evaluations per cell. "
            f"From `{exp.path.name}`."]


def cell_columns(dims: list[str]) -> list[str]:
    return (["cell", "country", "code", "set", "optimizer", "seed", "budget", "evaluations", "naive_l1", "icl_l1",
             "aligned_l1", "ratio"] + [f"err_{d}" for d in dims]
            + ["search_seconds", "evals_to_half_naive", "seconds_to_half_naive", "status", "error"]
            + [f"{p}_{d}" for p in ("target", "naive", "icl", "aligned") for d in dims] + ["aligned_option_mass"]
            + HELDOUT_COLUMNS)


# Held-out checks of a cell's soft prompt (`culturalign experiment --heldout`, cells/<cell>/heldout.json).
HELDOUT_COLUMNS = ["heldout_l1_without", "heldout_l1_with", "heldout_para_a_kept", "heldout_para_b_kept",
                   "heldout_reversed_kept", "heldout_mcq_without", "heldout_mcq_with", "heldout_ppl_without",
                   "heldout_ppl_with"]


def heldout_columns(result: dict | None) -> dict:
    """The flat cells.csv columns of one cell's held-out result (all None when it has none)."""
    row = dict.fromkeys(HELDOUT_COLUMNS)
    if result is None:
        return row
    base = result["survey"]["original"]
    row["heldout_l1_without"] = base["without"]["l1"]
    row["heldout_l1_with"] = (base["with"] or {}).get("l1")
    for v in result["survey"]["variants"]:
        key = ("heldout_reversed_kept" if v["kind"] == "reversed options" else
               "heldout_para_a_kept" if v["instrument"].endswith("-para-a") else
               "heldout_para_b_kept" if v["instrument"].endswith("-para-b") else None)
        if key:
            row[key] = v["kept"]
    m = result["mcq"]
    row["heldout_mcq_without"] = m["without"]["accuracy"]
    row["heldout_mcq_with"] = (m["with"] or {}).get("accuracy")
    row["heldout_ppl_without"] = result["perplexity"]["without"]
    row["heldout_ppl_with"] = result["perplexity"]["with"]
    return row


def write_outputs(out: Path, exp, rows: list[dict], curves: list[dict]) -> None:
    from culturalign.files import atomic_write_text

    out = Path(out)
    atomic_write_text(out / "cells.csv", _csv_text(rows, cell_columns(exp.dims)))
    atomic_write_text(out / "curves.csv", _csv_text(curves, CURVE_COLUMNS))
    plots = convergence_plots(out / "plots", rows, curves)
    atomic_write_text(out / "report.md", build_report(rows, _header(exp, rows), plots))


def summary_lines(rows: list[dict]) -> list[str]:
    """The L1 table, for the terminal."""
    return l1_table(rows)
