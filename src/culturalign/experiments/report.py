"""An experiment's tables and plots: cells.csv, curves.csv, plots/convergence-*.png and report.md.

Everything here is computed from the tidy rows (`runner.cell_rows`), so the report can be rebuilt from
the CSVs alone, and tested on crafted rows. The dimensions come from the rows' columns (the
instrument's indices), never from a fixed list.

- L1 per method and target: naive and icl (one value: the model is deterministic), and each optimizer's
  aligned L1 as mean ± sample std over seeds; the uniform floor (every item 1/K, no model) and the ratios to it.
- Specificity: each aligned profile scored against every grid target (cells.csv's `l1_to_<key>` columns): the
  matrix per optimizer, the own target's rank, and mean L1 to the other targets minus L1 to the own one.
- Convergence per target: per optimizer the median best L1 over seeds against evaluations, with the
  min-max band, and a dashed line at half the naive L1.
- Evaluations and seconds to reach half the naive L1: the median over the seeds that reached it.
- Per-dimension absolute error |score - target|: mean over the targets (and seeds) that publish it.
- Kendall tau per dimension across the grid's targets (as in the Cultural Alignment Test): does a method's
  profile rank the targets as their published scores do? Needs 3 or more targets with that dimension.
  The naive profile is the same for every target, so its tau is undefined (said so, not hidden).

Long because: every table and plot of report.md is computed here from the same tidy rows, with the small
helpers they share (targets, methods, finished cells).
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from culturalign.display import fmt

CURVE_COLUMNS = ["cell", "code", "set", "optimizer", "seed", "evaluations", "best_l1", "seconds"]
BASELINES = ("naive", "icl")


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

def _has_floor(rows) -> bool:
    return any(r.get("uniform_l1") is not None for r in rows)


def l1_table(rows: list[dict]) -> list[str]:
    """naive, icl and each optimizer per target; with the uniform floor as the last column (when the rows have it)
    and a row of ratios to it."""
    done, opts = _finished(rows), _optimizers(rows)
    floor = _has_floor(done)
    extra = ["uniform"] if floor else []
    lines = ["| target | set | naive | icl | " + " | ".join(opts + extra) + " |",
             "|---|---|---:|---:|" + "---:|" * (len(opts) + len(extra))]
    for key in _targets(rows):
        mine = [r for r in done if (r["code"], r["set"]) == key]
        cells = [fmt(statistics.mean([r[f"{b}_l1"] for r in mine])) if mine else "-" for b in BASELINES]
        cells += [_mean_std([r["aligned_l1"] for r in mine if r["optimizer"] == o]) for o in opts]
        if floor:
            u = [r["uniform_l1"] for r in mine if r.get("uniform_l1") is not None]
            cells.append(fmt(statistics.mean(u)) if u else "-")
        lines.append(f"| {_name(rows, key)} | {key[1]} | " + " | ".join(cells) + " |")
    icl = [r["icl_l1"] / r["naive_l1"] for r in done if r["naive_l1"]]
    u_naive = [r["uniform_l1"] / r["naive_l1"] for r in done if r["naive_l1"] and r.get("uniform_l1") is not None]
    lines.append("| **aligned / naive**, all targets | | 1.00 | " + (f"{statistics.mean(icl):.2f}" if icl else "-") + " | "
                 + " | ".join([_ratio(done, o) for o in opts] + ([_mean(u_naive)] if floor else [])) + " |")
    if floor:
        per = [r for r in done if r.get("uniform_l1")]
        lines.append("| **aligned / uniform**, all targets | | "
                     + " | ".join([_mean([r[f"{b}_l1"] / r["uniform_l1"] for r in per]) for b in BASELINES]
                                  + [_ratio(done, o, "ratio_uniform") for o in opts] + ["1.00"]) + " |")
    return lines


def _mean(vals: list[float]) -> str:
    return f"{statistics.mean(vals):.2f}" if vals else "-"


def _ratio(done, opt, column: str = "ratio") -> str:
    vals = [r[column] for r in done if r["optimizer"] == opt and r.get(column) is not None]
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


# ---- specificity: each aligned profile against every grid target ---------------------------------------------

def cross_keys(rows: list[dict]) -> list[str]:
    """The grid targets of the cross-target columns (`l1_to_<key>`), in grid order."""
    return [k[len(CROSS_PREFIX):] for k in rows[0] if k.startswith(CROSS_PREFIX)] if rows else []


def _own_key(r) -> str:
    return f"{r['code']}-{r['set']}"


def _key_name(rows, key) -> str:
    return next((r["country"] for r in rows if _own_key(r) == key), key)


def specificity_matrix(rows: list[dict], method: str) -> tuple[list[str], list[str], list[list[float | None]]]:
    """(own targets, grid targets, L1 matrix): for an optimizer, row = the cells' own target, column = a grid target,
    value = the aligned profile's L1 to it, mean over seeds. For the baselines naive and uniform (the same profile for
    every cell) a single row: their L1 to each grid target."""
    done, cols = _finished(rows), cross_keys(rows)
    if method in ("naive", "uniform"):
        vals = []
        for k in cols:
            v = [r[f"{method}_l1"] for r in done if _own_key(r) == k and r.get(f"{method}_l1") is not None]
            vals.append(statistics.mean(v) if v else None)
        return [method], cols, [vals]
    mine = [r for r in done if r["optimizer"] == method]
    own = [k for k in cols if any(_own_key(r) == k for r in mine)]
    matrix = []
    for o in own:
        sel = [r for r in mine if _own_key(r) == o]
        row = []
        for k in cols:
            v = [r[CROSS_PREFIX + k] for r in sel if r.get(CROSS_PREFIX + k) is not None]
            row.append(statistics.mean(v) if v else None)
        matrix.append(row)
    return own, cols, matrix


def specificity_summary(rows: list[dict]) -> dict[str, dict]:
    """{optimizer: {"cells", "mean", "std", "own_first"}} over finished cells with a specificity."""
    done, out = _finished(rows), {}
    for o in _optimizers(rows):
        sel = [r for r in done if r["optimizer"] == o and r.get("specificity") is not None]
        vals = [r["specificity"] for r in sel]
        out[o] = {"cells": len(sel), "mean": statistics.mean(vals) if vals else None,
                  "std": statistics.stdev(vals) if len(vals) > 1 else None,
                  "own_first": sum(r["own_rank"] == 1 for r in sel)}
    return out


def specificity_heatmap(path: Path, title: str, own: list[str], cols: list[str], matrix, names: dict[str, str]) -> None:
    from culturalign.display import pyplot

    plt = pyplot()
    import numpy as np

    from culturalign.files import atomic_write

    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 3, 0.7 * len(own) + 2))
    im = ax.imshow(m, cmap="viridis_r", aspect="auto")
    for i, o in enumerate(own):
        for j, k in enumerate(cols):
            if not np.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if m[i, j] > np.nanmean(m) else "black",
                        fontweight="bold" if o == k else "normal")
            if o == k:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([names.get(k, k) for k in cols], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(own)))
    ax.set_yticklabels([names.get(k, k) for k in own], fontsize=8)
    ax.set_xlabel("scored against (grid target)")
    ax.set_ylabel("prompt aligned to")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="L1 (lower = closer)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def specificity_plots(folder: Path, rows: list[dict]) -> dict[str, str]:
    """One heat map per optimizer (needs 2 or more grid targets); returns {optimizer: path relative to the folder}."""
    if len(cross_keys(rows)) < 2:
        return {}
    folder.mkdir(parents=True, exist_ok=True)
    names = {k: _key_name(rows, k) for k in cross_keys(rows)}
    paths = {}
    for o in _optimizers(_finished(rows)):
        own, cols, matrix = specificity_matrix(rows, o)
        if not own:
            continue
        name = f"specificity-{''.join(ch if ch.isalnum() or ch in '-_' else '-' for ch in o)}.png"
        specificity_heatmap(folder / name, f"{o}: aligned profile's L1 to every grid target", own, cols, matrix, names)
        paths[o] = f"{folder.name}/{name}"
    return paths


def _specificity_section(rows: list[dict], heatmaps: dict[str, str]) -> list[str]:
    cols = cross_keys(rows)
    if not cols or not any(r.get("specificity") is not None or r.get(CROSS_PREFIX + cols[0]) is not None
                           for r in _finished(rows)):
        return []
    lines = ["## Specificity: each aligned profile against every grid target", "",
             "Each finished cell's aligned profile scored against every target of the grid (arithmetic on its indices "
             "with the same constants; no model call). *specificity* = mean L1 to the other targets − L1 to the "
             "cell's own target, in points: above 0 the prompt is closer to its own culture than to the others. "
             "*own first*: cells whose own target is the closest of all. A profile that does not depend on the target "
             "(naive, uniform) has a mean specificity of exactly 0 over the targets and ranks its own target first "
             f"for one target in {len(cols)}.", ""]
    if len(cols) < 2:
        return lines + [f"Not computed: the grid has {len(cols)} target; specificity needs at least 2.", ""]
    summ = specificity_summary(rows)
    lines += ["| method | cells | mean specificity | own target first |", "|---|---:|---:|---:|"]
    for o, e in summ.items():
        if not e["cells"]:
            continue
        spec = "-" if e["mean"] is None else (f"{e['mean']:+.1f}" + ("" if e["std"] is None else f" ± {e['std']:.1f}"))
        lines.append(f"| {o} | {e['cells']} | {spec} | {e['own_first']}/{e['cells']} ({e['own_first'] / e['cells']:.0%}) |")
    names = {k: _key_name(rows, k) for k in cols}
    header = "| prompt aligned to | " + " | ".join(names[k] for k in cols) + " |"
    rule = "|---|" + "---:|" * len(cols)
    for o in _optimizers(_finished(rows)):
        own, _, matrix = specificity_matrix(rows, o)
        if not own:
            continue
        lines += ["", f"**{o}**: L1 of the aligned profile (rows, mean over seeds) to each grid target (columns); "
                      "the own target in bold; naive and uniform for reference.", "", header, rule]
        for k, vals in zip(own, matrix):
            cells = [(f"**{fmt(v)}**" if c == k else fmt(v)) for c, v in zip(cols, vals)]
            lines.append(f"| {names[k]} | " + " | ".join(cells) + " |")
        for ref in ("naive", "uniform"):
            _, _, [vals] = specificity_matrix(rows, ref)
            if any(v is not None for v in vals):
                lines.append(f"| *{ref}* | " + " | ".join(fmt(v) for v in vals) + " |")
        if o in heatmaps:
            lines += ["", f"![specificity, {o}]({heatmaps[o]})"]
    return lines + [""]


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
    """Per optimizer the median best L1 over seeds (a step curve) with its min-max band; the naive L1 and half of it."""
    import warnings

    import numpy as np

    from culturalign.display import convergence_plot as plot

    lines = []
    for opt, curves in curves_by_opt.items():
        curves = [sorted(c) for c in curves if c]
        if not curves:
            continue
        xs = sorted({x for c in curves for x, _ in c})
        ys = np.array([_step(c, xs) for c in curves], dtype=float)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med, lo, hi = np.nanmedian(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
        lines.append({"x": xs, "y": med, "label": f"{opt} (median of {len(curves)})", "band": (lo, hi) if len(curves) > 1 else None,
                      "style": {"drawstyle": "steps-post", "marker": "o", "markersize": 2.5}})
    refs = [] if naive_l1 is None else [(naive_l1, f"naive L1 ({naive_l1:.1f})", "tab:gray", ":"),
                                        (naive_l1 / 2, f"½ naive ({naive_l1 / 2:.1f})", "black", "--")]
    plot(path, lines, refs, ylabel="best L1 to target", title=title, size=(8.5, 4.2), dpi=110,
         legend={"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)})


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


def build_report(rows: list[dict], header: list[str], plots: dict[tuple[str, str], str],
                 heatmaps: dict[str, str] | None = None) -> str:
    dims, opts, done = dims_of(rows), _optimizers(rows), _finished(rows)
    methods = _methods(rows)
    lines = list(header)
    lines += ["", "## L1 to the target", "",
              "Lower is better. naive and icl are the model without a soft prompt (one value per target); each optimizer's "
              "column is the aligned profile's L1, mean ± sample std over seeds.", ""]
    lines += l1_table(rows)
    if _has_floor(done):
        lines += ["", "uniform is the floor: an answerer that spreads every item evenly over its options (no model "
                      "call), scored with the same formulas and constants. A profile above it (ratio > 1) is further from "
                      "the target than even answers are."]
    spec = _specificity_section(rows, heatmaps or {})
    if spec:
        lines += [""] + spec[:-1]
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


def cell_columns(dims: list[str], target_keys: list[str] | None = None) -> list[str]:
    """cells.csv's columns; `target_keys` (`runner.target_key` of each grid target) name the cross-target ones."""
    return (["cell", "country", "code", "set", "optimizer", "seed", "budget", "evaluations", "naive_l1", "icl_l1",
             "aligned_l1", "ratio"] + [f"err_{d}" for d in dims]
            + ["search_seconds", "evals_to_half_naive", "seconds_to_half_naive", "status", "error"]
            + [f"{p}_{d}" for p in ("target", "naive", "icl", "aligned") for d in dims] + ["aligned_option_mass"]
            + HELDOUT_COLUMNS + list(floor_columns(target_keys or [])))


# The uniform floor and the specificity control (appended after the held-out columns):
#   uniform_l1      L1 of the uniform answerer (every item 1/K, no model) to the cell's target
#   ratio_uniform   aligned_l1 / uniform_l1 (below 1: closer than even answers)
#   own_rank        rank of the cell's own target among every grid target by the aligned profile's L1 (1 = closest)
#   specificity     mean L1 to the other grid targets - L1 to the own target (points; > 0: culture-specific)
#   l1_to_<key>     the aligned profile's L1 to each grid target (key = CODE-set, the cell folder's prefix)
FLOOR_COLUMNS = ["uniform_l1", "ratio_uniform", "own_rank", "specificity"]
CROSS_PREFIX = "l1_to_"


def floor_columns(target_keys: list[str]) -> dict:
    """The appended columns, all None."""
    return dict.fromkeys(FLOOR_COLUMNS + [CROSS_PREFIX + k for k in target_keys])


def rank_and_specificity(own: str, l1s: dict[str, float | None]) -> tuple[int | None, float | None]:
    """(rank of `own` among the targets by L1, 1 = closest, ties share the better rank; mean L1 to the other targets
    minus the L1 to `own`). Targets without an L1 are left out; the specificity needs at least one other target."""
    known = {k: v for k, v in l1s.items() if v is not None}
    if own not in known:
        return None, None
    mine = known[own]
    others = [v for k, v in known.items() if k != own]
    rank = 1 + sum(v < mine for v in others)
    return rank, (statistics.mean(others) - mine) if others else None


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
    from culturalign.experiments.runner import target_key

    atomic_write_text(out / "cells.csv", _csv_text(rows, cell_columns(exp.dims, [target_key(t) for t in exp.targets])))
    atomic_write_text(out / "curves.csv", _csv_text(curves, CURVE_COLUMNS))
    plots = convergence_plots(out / "plots", rows, curves)
    heatmaps = specificity_plots(out / "plots", rows)
    atomic_write_text(out / "report.md", build_report(rows, _header(exp, rows), plots, heatmaps))


def summary_lines(rows: list[dict]) -> list[str]:
    """The L1 table, for the terminal."""
    return l1_table(rows)
