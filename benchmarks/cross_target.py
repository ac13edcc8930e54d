"""The cross-target matrix of aligned profiles, from experiments' cells.csv files alone (no model call).

    python benchmarks/cross_target.py benchmarks/experiments/paper/cells.csv
    python benchmarks/cross_target.py --targets SA@hofstede-2023,US,CN,IN benchmarks/experiments/china-*/cells.csv

Each cell's aligned index scores (the `aligned_*` columns) are compared with every target: the grid's own
targets (the `target_*` columns of the files given), or those named by `--targets` (CODE or CODE@SET).
Printed: the L1 matrix, the rank of each prompt's own target (1 = closest) and its specificity = mean L1 to
the other targets - L1 to its own (points; positive = culture-specific), with each naive profile as a
reference row. `culturalign experiment` writes the same for its grid in cells.csv and report.md; this script
also reads grids recorded before that, and compares single-target grids with other targets.
"""

import argparse
import csv
from pathlib import Path

from culturalign.experiments.report import rank_and_specificity
from culturalign.measure.targets import Target, l1, load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", nargs="+", help="cells.csv files of finished experiments")
    ap.add_argument("--targets", help="comma-separated targets, CODE or CODE@SET (default: the files' own)")
    args = ap.parse_args()
    rows = [{**r, "_from": Path(path).parent.name} for path in args.cells
            for r in csv.DictReader(open(path, newline="", encoding="utf-8"))]
    dims = [k.removeprefix("target_") for k in rows[0] if k.startswith("target_")]
    if args.targets:
        targets = {}
        for spec in args.targets.split(","):
            code, _, set_name = spec.partition("@")
            t = load_target(code, set_name or "hofstede-2015")
            targets[f"{code}@{t.set_name}"] = t
    else:
        targets = {r["code"] + "@" + r["set"]: Target(r["country"], {d: float(r[f"target_{d}"]) for d in dims
                                                                      if r[f"target_{d}"] != ""}) for r in rows}
    names = list(targets)

    print("| prompt | " + " | ".join(names) + " | own rank | specificity |")
    print("|---|" + "---:|" * (len(names) + 2))
    for kind in ("aligned", "naive"):
        seen = set()
        for r in rows:
            ind = {d: float(r[f"{kind}_{d}"]) for d in dims}
            own = r["code"] + "@" + r["set"]
            if own not in targets or (kind == "naive" and tuple(ind.values()) in seen):
                continue
            seen.add(tuple(ind.values()))
            dist = {n: l1(ind, targets[n])[0] for n in names}
            rank, spec = rank_and_specificity(own, dist)  # the experiment report's own definition
            label = f"{r['_from']}: {r['cell']}" if kind == "aligned" else f"naive ({r['_from']})"
            print(f"| {label} | " + " | ".join(f"{'**' if n == own else ''}{dist[n]:.1f}{'**' if n == own else ''}"
                                             for n in names) + f" | {rank} | {spec:+.1f} |")


if __name__ == "__main__":
    main()
