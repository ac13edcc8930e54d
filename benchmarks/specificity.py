"""Is the committee's alignment cultural, or a push away from zero? The shipped experts under three index scorings.

    python benchmarks/specificity.py [--registry DIR] [--out benchmarks/specificity.json]

Each registry expert answers the two held-out paraphrase variants (vsm2013-para-a, -b) once; its indices
are then scored against every registry culture with the committee's one alignment formula
(`committee.metrics.alignment_score`), under three choices of the index constants C:
- `C = 0`: paper A's setting and culturalign's default;
- `set mean`: C = the 2015 set's mean score per dimension, so a uniform answerer sits at the set's mean;
- `naive at mean`: C = set mean - the naive model's indices (per variant), so the naive model sits there.
The answers are the same in all three; only the measure changes. For each scoring it prints the mean
alignment of the own expert, of the other experts (`wrong-expert`), of naive and of a uniform answerer,
the specificity (own - wrong) and how many cultures' own expert is their best expert.
"""

import argparse
import json
import statistics
from pathlib import Path

from culturalign.backends import load_backend
from culturalign.committee.experts import load_registry
from culturalign.committee.metrics import alignment_score, expert_matrix_rows, specificity
from culturalign.display import quiet_libraries
from culturalign.measure.instrument import load_instrument, paraphrase_variants
from culturalign.measure.survey import Survey, uniform_result
from culturalign.measure.targets import load_target_set


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--registry", default=None, help="expert registry folder (default: the shipped one)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("specificity.json")))
    args = ap.parse_args()
    quiet_libraries()
    backend = load_backend(args.model)
    reg = load_registry(args.registry, backend.name, backend.hidden_size)
    base = load_instrument(reg.instrument)
    targets = {code: load_target_set(e.info["target"]["set"]).find(code) for code, e in reg.experts.items()}
    set_mean = load_target_set("hofstede-2015").mean_scores(base.dims)
    raw, naive, uniform = {}, {}, {}
    for vid in paraphrase_variants(reg.instrument):
        inst = load_instrument(vid)
        sv = Survey(backend, inst, "naive", None, None)
        naive[vid] = sv.result().indices
        uniform[vid] = uniform_result(inst).indices
        raw[vid] = {code: sv.result(e.embeddings).indices for code, e in reg.experts.items()}
        print(f"{vid}: {len(raw[vid])} experts answered", flush=True)
    scorings = {
        "C = 0": {v: {d: 0.0 for d in base.dims} for v in raw},
        "set mean": {v: dict(set_mean) for v in raw},
        "naive at mean": {v: {d: set_mean[d] - naive[v][d] for d in base.dims} for v in raw},
    }
    report = {"registry": str(reg.path), "model": backend.name, "set_mean": set_mean, "scorings": {}}
    cultures = list(targets)
    print("| scoring | own expert | other experts | naive | uniform | specificity | own expert best |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, C in scorings.items():
        shift = lambda ind, v: {d: ind[d] + C[v][d] for d in ind}  # noqa: E731
        ind = {v: {e: shift(i, v) for e, i in per.items()} for v, per in raw.items()}
        summary, _ = specificity(expert_matrix_rows(ind, targets, cultures))
        ref = {which: statistics.fmean(alignment_score(shift(src[v], v), targets[c].scores)[0] for v in raw for c in cultures)
               for which, src in (("naive", naive), ("uniform", uniform))}
        own = statistics.fmean(p["own"] for p in summary["per_culture"].values())
        wrong = statistics.fmean(p["wrong_mean"] for p in summary["per_culture"].values())
        report["scorings"][name] = {"constants": C, "own": own, "wrong": wrong, **ref, "specificity": summary["mean"],
                                    "own_best": summary["own_best"], "n_cultures": summary["n_cultures"],
                                    "per_culture": summary["per_culture"], "matrix": summary["alignment"],
                                    "experts": summary["experts"], "cultures": summary["cultures"]}
        print(f"| {name} | {own:.3f} | {wrong:.3f} | {ref['naive']:.3f} | {ref['uniform']:.3f} | "
              f"{summary['mean']:+.3f} | {summary['own_best']} of {summary['n_cultures']} |")
    Path(args.out).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
