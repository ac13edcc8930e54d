"""The committee's reports: what `culturalign committee eval` writes (metrics.json, tidy CSVs, report.md and
three plots), and its terminal output (a registry of experts as a table, one answer with its routing)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rich.console import Console
from rich.table import Table

from culturalign.display import fmt
from culturalign.files import atomic_write, atomic_write_json, atomic_write_text

CSV_FILES = {"results.csv": "rows", "alignment.csv": "alignment_rows", "diversity.csv": "diversity_rows",
             "specificity.csv": "specificity_rows"}


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _pm(s: dict | None, nd: int = 3) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}"


def _num(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _systems(metrics: dict) -> list[str]:
    return list(metrics["systems"]) + list(metrics.get("reference_systems", []))


def metrics_table(metrics: dict) -> list[str]:
    """The README/report table: one row per system, then the reference systems (uniform, wrong-expert)."""
    lines = [
        "| system | alignment (registry) | alignment (held-out) | diversity (bits) | expert responses / query "
        "| unique cultures / query | completeness | latency p50 (s) | latency p95 (s) | p50 / naive |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in _systems(metrics):
        m = metrics["per_system"][s]
        lines.append(
            f"| {s} | {_pm(m['alignment_registry'])} | {_pm(m['alignment_heldout'])} | {_pm(m['diversity_bits'])} "
            f"| {_pm(m['responses_per_query'], 2)} | {_pm(m['unique_cultures_per_query'], 2)} "
            f"| {_num(m['completeness'])} | {_num(m['latency_p50_s'])} | {_num(m['latency_p95_s'])} "
            f"| {_num(m['latency_ratio_to_naive'], 2)} |"
        )
    return lines


def router_lines(r: dict) -> list[str]:
    return [
        f"- top-1 accuracy on {r['tagged_queries']} culture-tagged queries (cultures with an expert, routed from the "
        f"text alone): **{_num(r['top1_accuracy'])}**; top-{r['top_k']}: {_num(r['topk_accuracy'])}",
        f"- gate on {r['neutral_queries']} neutral controls (sent to the base model alone): {_num(r['gate_accuracy_neutral'])} "
        f"without a user culture, {_num(r['gate_accuracy_neutral_with_user_culture'])} with one",
        f"- gate recall on culture-dependent queries (kept for the experts): {_num(r['gate_recall_culture_dependent'])}",
    ]


def specificity_lines(spec: dict | None) -> list[str]:
    """The wrong-expert control: specificity per culture and its mean, and how often the own expert is best."""
    if not spec or not spec.get("per_culture"):
        return []
    per = spec["per_culture"]
    lines = [f"- specificity (own expert's alignment - mean of the other experts'), mean over {spec['n_cultures']} "
             f"registry cultures: **{spec['mean']:+.3f}**; the own expert is the best expert for "
             f"**{spec['own_best']} of {spec['n_cultures']}**", "",
             "| culture | own expert | other experts (mean) | specificity | best expert |", "|---|---:|---:|---:|---|"]
    for c, v in per.items():
        lines.append(f"| {c} | {v['own']:.3f} | {v['wrong_mean']:.3f} | {v['specificity']:+.3f} | {v['best_expert']} |")
    return lines


def specificity_plot(path: Path, spec: dict) -> None:
    """Culture x expert alignment matrix as a heat map; the own expert boxed."""
    from culturalign.display import pyplot

    plt = pyplot()
    import numpy as np

    cultures, experts = spec["cultures"], spec["experts"]
    m = np.array(spec["alignment"], dtype=float)
    fig, ax = plt.subplots(figsize=(0.8 * len(experts) + 3, 0.6 * len(cultures) + 2))
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i, c in enumerate(cultures):
        for j, e in enumerate(experts):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if m[i, j] > 0.6 else "white", fontweight="bold" if c == e else "normal")
            if c == e:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(experts)))
    ax.set_xticklabels(experts)
    ax.set_yticks(range(len(cultures)))
    ax.set_yticklabels(cultures)
    ax.set_xlabel("expert (soft prompt)")
    ax.set_ylabel("user culture")
    ax.set_title("alignment of each expert with each culture (held-out VSM paraphrases)", fontsize=9)
    fig.colorbar(im, ax=ax, label="cultural alignment")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def alignment_plot(path: Path, rows: list[dict], systems: list[str]) -> None:
    from culturalign.display import pyplot

    plt = pyplot()
    import numpy as np

    cultures = list(dict.fromkeys(r["culture"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(cultures) * len(systems) / 2), 4))
    width = 0.8 / len(systems)
    x = np.arange(len(cultures))
    for k, s in enumerate(systems):
        vals = []
        for c in cultures:
            got = [r["alignment"] for r in rows if r["system"] == s and r["culture"] == c]
            vals.append(np.mean(got) if got else np.nan)  # wrong-expert: registry cultures only
        ax.bar(x + (k - (len(systems) - 1) / 2) * width, vals, width, label=s)
    held = [i for i, c in enumerate(cultures) if not any(r["in_registry"] for r in rows if r["culture"] == c)]
    if held:
        ax.axvspan(min(held) - 0.5, max(held) + 0.5, color="0.92", zorder=0, label="held out of the registry")
    ax.set_xticks(x)
    ax.set_xticklabels(cultures)
    ax.set_ylim(0, 1)
    ax.set_ylabel("cultural alignment (held-out VSM paraphrases)")
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def latency_plot(path: Path, rows: list[dict], systems: list[str]) -> None:
    from culturalign.display import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, kind, title in ((axes[0], False, "queries with options"), (axes[1], True, "open questions")):
        data = [[r["seconds"] for r in rows if r["system"] == s and (r["kind"] == "open") == kind] for s in systems]
        if any(data):
            ax.boxplot([d or [0.0] for d in data], showfliers=True)
            ax.set_xticks(range(1, len(systems) + 1))
            ax.set_xticklabels(systems)
        ax.set_title(title)
        ax.set_ylabel("seconds per query")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_eval(out: str | Path, result, settings: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = result.metrics
    atomic_write_json(out / "metrics.json", {"settings": settings, **m}, indent=2)
    for name, attr in CSV_FILES.items():
        atomic_write_text(out / name, _csv_text(getattr(result, attr)))
    systems = m["systems"]
    alignment_plot(out / "alignment.png", result.alignment_rows, _systems(m))
    latency_plot(out / "latency.png", result.rows, systems)
    spec = m.get("specificity")
    if spec and spec.get("cultures") and spec.get("experts"):
        specificity_plot(out / "specificity.png", spec)
    lines = [
        f"# Committee evaluation: {settings.get('model')}", "",
        f"Registry {settings.get('experts')} ({len(settings.get('registry_cultures', []))} experts: "
        f"{', '.join(settings.get('registry_cultures', []))}); held-out cultures: {', '.join(settings.get('heldout_cultures', []))}; "
        f"{settings.get('queries')} queries; {m.get('seconds')} s in all.", "",
        *metrics_table(m), "",
        "Mean ± std: alignment over cultures (and the two paraphrase variants), diversity over untagged value "
        "questions, responses and cultures over queries. Definitions: README, 'Committee metrics'. "
        "Reference systems, which answer no query: uniform (every item answered evenly over its options, no model: "
        "the floor) and wrong-expert (each registry culture served by each other registry expert, the mean).", "",
        "## Router", "", *router_lines(m["router"]), "",
    ]
    spec_lines = specificity_lines(spec)
    if spec_lines:
        lines += ["## Specificity: the own expert against the others", "", *spec_lines, "", "![specificity](specificity.png)", ""]
    lines += [
        "![alignment](alignment.png)", "", "![latency](latency.png)", "",
        "Files: metrics.json, results.csv (query x system), alignment.csv (system x culture x variant), "
        "diversity.csv (system x question), specificity.csv (culture x expert alignment, mean over the variants).", "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))


# ---- the terminal: a registry of experts, and one answer of the committee ----------------------------

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
