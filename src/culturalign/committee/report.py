"""What `culturalign committee eval` writes: metrics.json, tidy CSVs, report.md and two plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from culturalign.files import atomic_write, atomic_write_json, atomic_write_text

CSV_FILES = {"results.csv": "rows", "alignment.csv": "alignment_rows", "diversity.csv": "diversity_rows"}


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


def metrics_table(metrics: dict) -> list[str]:
    """The README/report table: one row per system."""
    lines = [
        "| system | alignment (registry) | alignment (held-out) | diversity (bits) | expert responses / query "
        "| unique cultures / query | completeness | latency p50 (s) | latency p95 (s) | p50 / naive |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in metrics["systems"]:
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


def alignment_plot(path: Path, rows: list[dict], systems: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cultures = list(dict.fromkeys(r["culture"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(cultures) * len(systems) / 2), 4))
    width = 0.8 / len(systems)
    x = np.arange(len(cultures))
    for k, s in enumerate(systems):
        vals = [np.mean([r["alignment"] for r in rows if r["system"] == s and r["culture"] == c]) for c in cultures]
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    alignment_plot(out / "alignment.png", result.alignment_rows, systems)
    latency_plot(out / "latency.png", result.rows, systems)
    lines = [
        f"# Committee evaluation: {settings.get('model')}", "",
        f"Registry {settings.get('experts')} ({len(settings.get('registry_cultures', []))} experts: "
        f"{', '.join(settings.get('registry_cultures', []))}); held-out cultures: {', '.join(settings.get('heldout_cultures', []))}; "
        f"{settings.get('queries')} queries; {m.get('seconds')} s in all.", "",
        *metrics_table(m), "",
        "Mean ± std: alignment over cultures (and the two paraphrase variants), diversity over untagged value "
        "questions, responses and cultures over queries. Definitions: README, 'Committee metrics'.", "",
        "## Router", "", *router_lines(m["router"]), "",
        "![alignment](alignment.png)", "", "![latency](latency.png)", "",
        "Files: metrics.json, results.csv (query x system), alignment.csv (system x culture x variant), "
        "diversity.csv (system x question).", "",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines))
