"""What people look at: comparison tables in the terminal, plots and a Markdown report on disk."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from culturalign.survey import SurveyResult


def fmt(x: float | None, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def profile_table(results: list[SurveyResult], title: str | None = None) -> Table:
    """Dimensions as rows; the target, then each profile as columns; L1 and option mass at the foot."""
    target = results[0].target
    table = Table(title=title, title_justify="left")
    table.add_column("dim")
    if target is not None:
        table.add_column(f"target\n{target.name}", justify="right", style="bold")
    for r in results:
        table.add_column(r.prompt, justify="right")
    for d in results[0].indices:
        row = [d]
        if target is not None:
            row.append(fmt(target.scores.get(d)) if d in target.scores else "n/a")
        row += [fmt(r.indices[d]) for r in results]
        table.add_row(*row)
    table.add_section()
    if target is not None:
        table.add_row("L1", "", *[fmt(r.l1) for r in results], style="bold")
    table.add_row("option mass", *([""] if target is not None else []), *[f"{r.mean_option_mass:.3f}" for r in results])
    return table


def print_profiles(results: list[SurveyResult], console: Console | None = None) -> None:
    console = console or Console()
    r0 = results[0]
    consts = ", ".join(f"{k}={v:g}" for k, v in r0.constants.items())
    console.print(profile_table(results, title=f"{r0.instrument} profile of {r0.model} ({r0.mode})"))
    console.print(f"index constants C: {consts}", soft_wrap=True)
    if r0.target is not None and r0.missing_dims:
        console.print(
            f"[yellow]{r0.target.name} has no published {', '.join(r0.missing_dims)} in this target set; "
            f"L1 covers {', '.join(r0.l1_dims)} only.[/yellow]", soft_wrap=True
        )
    low = [r.prompt for r in results if r.mean_option_mass < 0.5]
    if low:
        console.print(f"[yellow]low option mass for {', '.join(low)}: the model rarely answers with a code under that prompt.[/yellow]",
                      soft_wrap=True)


def radar_plot(path, results: list[SurveyResult]) -> None:
    """Target vs each profile on the six dimensions (one polygon each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dims = list(results[0].indices)
    angles = np.linspace(0, 2 * np.pi, len(dims), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(6, 6), subplot_kw={"polar": True})
    series = []
    target = results[0].target
    if target is not None:
        series.append((f"target ({target.name})", [target.scores.get(d, np.nan) for d in dims], "black", "--"))
    colors = ["tab:gray", "tab:blue", "tab:red", "tab:green", "tab:purple"]
    for r, c in zip(results, colors):
        series.append((f"{r.prompt} (L1 {fmt(r.l1)})", [r.indices[d] for d in dims], c, "-"))
    for label, vals, color, ls in series:
        v = list(vals) + [vals[0]]
        ax.plot(angles + angles[:1], v, color=color, linestyle=ls, linewidth=2, label=label, marker="o", markersize=3)
    ax.set_xticks(angles)
    ax.set_xticklabels(dims)
    ax.set_title(f"{results[0].instrument} profile of {results[0].model}", pad=20)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def convergence_plot(path, history: list[dict], baselines: dict[str, float | None]) -> None:
    """Best (and population-mean) loss against candidate evaluations, with the baselines' L1 as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ev = [h["evaluations"] for h in history]
    ax.plot(ev, [h["best_loss"] for h in history], marker="o", markersize=3, label="best loss")
    ax.plot(ev, [h["mean_loss"] for h in history], alpha=0.5, label="mean loss (population / step)")
    for (name, value), color in zip(baselines.items(), ["tab:gray", "tab:blue", "black"]):
        if value is not None:
            ax.axhline(value, linestyle="--", color=color, label=f"{name} L1 ({value:.1f})")
    ax.set_xlabel("candidate evaluations (full surveys)")
    ax.set_ylabel("L1 to target (+ mass penalty)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def experts_table(registry) -> Table:
    """A registry as a table: one row per expert."""
    table = Table(title=f"{len(registry)} experts for {registry.model} (hidden {registry.hidden_size}) in {registry.path}",
                  title_justify="left")
    for col, right in (("code", False), ("culture", False), ("target set", False), ("naive L1", True),
                       ("aligned L1", True), ("aligned/naive", True), ("option mass", True), ("optimizer", False),
                       ("evaluations", True)):
        table.add_column(col, justify="right" if right else "left")
    for e in registry.experts.values():
        i = e.info
        naive, aligned = i.get("naive_l1"), i.get("aligned_l1")
        ratio = f"{aligned / naive:.2f}" if naive and aligned is not None else "-"
        mass = i.get("aligned_option_mass")
        table.add_row(e.code, e.name, i.get("target", {}).get("set", "-"), fmt(naive), fmt(aligned), ratio,
                      "-" if mass is None else f"{mass:.3f}", str(i.get("optimizer", "-")), str(i.get("evaluations", "-")))
    return table


def print_answer(answer, console: Console | None = None) -> None:
    """The routing, each expert's answer, and the composed answer of `Committee.ask`."""
    from rich.markup import escape

    console = console or Console()
    r = answer.routing
    if r is not None:
        who = ", ".join(f"{e['code']} {e['weight']:.2f}" for e in r["experts"]) or "the base model alone"
        console.print(f"[bold]routing[/bold] ({'culture-dependent' if r['culture_dependent'] else 'neutral'}, "
                      f"gate {r['gate_score']:.2f}): {escape(who)}", highlight=False, soft_wrap=True)
        for reason in r["reasons"]:
            console.print(f"  - {reason['stage']}: {escape(reason['detail'])}", highlight=False, soft_wrap=True)
    else:
        console.print(f"[bold]system[/bold] {answer.system}: no routing", highlight=False)
    if answer.options is not None:
        table = Table(title_justify="left")
        table.add_column("option")
        for e in answer.experts:
            table.add_column(f"{e['name']}\n(w {e['weight']:.2f})", justify="right")
        table.add_column(answer.system, justify="right", style="bold")
        for k, opt in enumerate(answer.options):
            table.add_row(f"{k + 1}. {opt}", *[f"{e['probs'][k]:.2f}" for e in answer.experts], f"{answer.answer['probs'][k]:.2f}")
        console.print(table)
        console.print(f"[bold]answer[/bold]: {answer.answer['choice']}. {escape(answer.answer['option'])} "
                      f"(option mass {answer.answer['option_mass']:.2f})", highlight=False, soft_wrap=True)
    else:
        for e in answer.experts:
            console.print(f"[bold]{escape(e['name'])}[/bold] (w {e['weight']:.2f}, {e['tokens']} tokens): {escape(e['text'])}",
                          highlight=False, soft_wrap=True)
        tag = "composed answer" if answer.answer.get("composed") else "answer"
        console.print(f"[bold]{tag}[/bold]: {escape(answer.answer['text'])}", highlight=False, soft_wrap=True)
    console.print(f"{answer.seconds:.2f} s, {answer.tokens.get('generated', 0)} tokens generated", highlight=False)
