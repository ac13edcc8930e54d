"""Terminal tables (rich) for the held-out checks and the MCQ check."""

from __future__ import annotations

from rich.table import Table

from culturalign.heldout.checks import HEADERS, order_words, heldout_rows, prompt_name


def heldout_table(result: dict) -> Table:
    t = result["target"]
    title = (f"held-out checks of {prompt_name(result.get('soft_prompt'), code=False)} on {result['model']} "
             f"(target {t['name']}, prompt {result['prompt']}{order_words(result)})")
    table = Table(title=title, title_justify="left")
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i == 0 else "right")
    rows = heldout_rows(result)
    n_survey = 1 + len(result["survey"]["variants"])
    for i, row in enumerate(rows):
        if i == n_survey:
            table.add_section()
        table.add_row(*row)
    return table


def _pct(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def mcq_table(res: dict) -> Table:
    """Accuracy overall and per country, without and (if measured) with the soft prompt."""
    with_ = res["with"] is not None
    table = Table(title=f"MCQ check: {res['questions']} questions from {res['source']} ({res['format']})",
                  title_justify="left")
    for h in ("country", "questions", "accuracy without", *(["accuracy with", "change"] if with_ else []),
              "P(correct) without", *(["P(correct) with"] if with_ else [])):
        table.add_column(h, justify="left" if h == "country" else "right")

    def row(label, n, w, s):
        cells = [label, str(n), _pct(w["accuracy"])]
        if with_:
            cells += [_pct(s["accuracy"]), f"{s['accuracy'] - w['accuracy']:+.3f}"]
        cells.append(_pct(w["mean_p_correct"]))
        if with_:
            cells.append(_pct(s["mean_p_correct"]))
        return cells

    table.add_row(*row("all", res["questions"], res["without"], res["with"]), style="bold")
    table.add_section()
    for c, w in res["without"]["by_country"].items():
        table.add_row(*row(c, w["n"], w, res["with"]["by_country"][c] if with_ else None))
    return table


def mcq_notes(res: dict) -> list[str]:
    w, s = res["without"], res["with"]
    lines = [f"chance (1 / options, averaged): {res['chance']:.3f}",
             f"answer prior without the prompt: always {w['prior_letter']} scores {w['prior_accuracy']:.3f}"
             + ("" if s is None else f"; with it: always {s['prior_letter']} scores {s['prior_accuracy']:.3f}"),
             f"mean option mass (probability on the option letters): {w['mean_option_mass']:.3f}"
             + ("" if s is None else f" without, {s['mean_option_mass']:.3f} with the prompt")]
    if res["skipped"]:
        lines.append(f"{res['skipped']} question(s) left out: not exactly one true option (CulturalBench-Hard)")
    return lines
