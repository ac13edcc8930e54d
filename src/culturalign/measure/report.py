"""A measured profile as people look at it: a table in the terminal and a radar plot on disk."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from culturalign.display import fmt
from culturalign.measure.survey import SurveyResult


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
    import numpy as np

    from culturalign.display import pyplot

    plt = pyplot()

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
