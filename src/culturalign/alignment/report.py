"""An alignment run's report on disk: report.md, radar.png (the profiles) and convergence.png (the search)."""

from __future__ import annotations

from culturalign.display import fmt
from culturalign.measure.report import radar_plot
from culturalign.measure.survey import SurveyResult


def convergence_plot(path, history: list[dict], baselines: dict[str, float | None]) -> None:
    """Best (and population-mean) loss against candidate evaluations, with the baselines' L1 as lines."""
    from culturalign.display import convergence_plot as plot

    ev = [h["evaluations"] for h in history]
    curves = [{"x": ev, "y": [h["best_loss"] for h in history], "label": "best loss", "style": {"marker": "o", "markersize": 3}},
              {"x": ev, "y": [h["mean_loss"] for h in history], "label": "mean loss (population / step)",
               "style": {"alpha": 0.5}}]
    lines = [(value, f"{name} L1 ({value:.1f})", color, "--")
             for (name, value), color in zip(baselines.items(), ["tab:gray", "tab:blue", "black"]) if value is not None]
    plot(path, curves, lines, ylabel="L1 to target (+ mass penalty)")


def write_report(out, result: dict, profiles: list[SurveyResult], uniform: SurveyResult | None = None) -> None:
    """radar.png, convergence.png and report.md in `out`. `profiles`: naive first, aligned last; `uniform`: the
    floor (`survey.uniform_result`), shown as one more column and line, and compared with the aligned L1."""
    from pathlib import Path

    out = Path(out)
    shown = profiles + ([uniform] if uniform is not None else [])
    radar_plot(out / "radar.png", shown)
    baselines = {p.prompt: p.l1 for p in profiles[:2]}
    if uniform is not None:
        baselines[uniform.prompt] = uniform.l1
    convergence_plot(out / "convergence.png", result["history"], baselines)
    s, target = result["settings"], profiles[0].target
    dims = list(profiles[0].indices)
    lines = [
        f"# Cultural alignment of {s['model']} to {target.name}", "",
        f"Instrument {s['instrument']}, target set {target.set_name or 'custom'}, optimiser {s['optimizer']}, "
        f"{result['evaluations']} candidate evaluations in {result['search_seconds']} s, seed {s['seed']}.", "",
        "| dim | target | " + " | ".join(p.prompt for p in shown) + " |",
        "|---|---:|" + "---:|" * len(shown),
    ]
    for d in dims:
        t = fmt(target.scores.get(d)) if d in target.scores else "n/a"
        lines.append(f"| {d} | {t} | " + " | ".join(fmt(p.indices[d]) for p in shown) + " |")
    lines.append("| **L1** | | " + " | ".join(f"**{fmt(p.l1)}**" for p in shown) + " |")
    lines.append("| option mass | | " + " | ".join(f"{p.mean_option_mass:.3f}" for p in shown) + " |")
    naive_l1, aligned_l1 = profiles[0].l1, profiles[-1].l1
    lines += [""]
    if naive_l1:
        lines.append(f"The aligned soft prompt reduces the L1 distance by {100 * (1 - aligned_l1 / naive_l1):.0f}% "
                     f"relative to the naive model ({fmt(naive_l1)} -> {fmt(aligned_l1)}).")
    if uniform is not None and uniform.l1:
        ratios = f"aligned / uniform {aligned_l1 / uniform.l1:.2f}" + (f", aligned / naive {aligned_l1 / naive_l1:.2f}"
                                                                       if naive_l1 else "")
        lines.append(f"The uniform answerer (every item 1/K over its options, no model call) has L1 {fmt(uniform.l1)}: "
                     f"{ratios}. Below 1 means the aligned profile is closer to {target.name} than even answers are.")
    if profiles[0].missing_dims:
        lines.append(f"{target.name} has no published {', '.join(profiles[0].missing_dims)}; L1 covers {', '.join(profiles[0].l1_dims)}.")
    consts = ", ".join(f"{k}={v:g}" for k, v in s["constants"].items())
    lines += ["", f"Index constants C: {consts}.", "", "![profiles](radar.png)", "", "![convergence](convergence.png)", "",
              "## Settings", "", "```json", __import__("json").dumps({k: v for k, v in s.items() if k != "target"}, indent=1), "```", ""]
    (out / "report.md").write_text("\n".join(lines), encoding="utf-8")
