"""The cross-target matrix of an experiment's aligned profiles, from its cells.csv alone (no model call).

    python benchmarks/cross_target.py benchmarks/experiments/paper/cells.csv

Each cell's aligned index scores (the `aligned_*` columns) are compared with every target of the grid
(the `target_*` columns of the cells), under the constants the cells were scored with. Printed: the L1
matrix, the rank of each prompt's own target (1 = closest) and its specificity = mean L1 to the other
targets - L1 to its own (points; positive = culture-specific), with the naive profile as reference. For
experiments run since the specificity control was added, `culturalign experiment` writes the same in
cells.csv and report.md; this script reads grids recorded before it.
"""

import csv
import sys


def main(path: str) -> None:
    rows = list(csv.DictReader(open(path, newline="", encoding="utf-8")))
    dims = [k.removeprefix("target_") for k in rows[0] if k.startswith("target_")]
    targets = {r["code"] + "@" + r["set"]: {d: float(r[f"target_{d}"]) for d in dims if r[f"target_{d}"] != ""} for r in rows}
    names = list(targets)

    def l1(ind, tgt):
        return sum(abs(ind[d] - tgt[d]) for d in tgt)

    print("| prompt | " + " | ".join(names) + " | own rank | specificity |")
    print("|---|" + "---:|" * (len(names) + 2))
    for kind in ("aligned", "naive"):
        for r in rows:
            ind = {d: float(r[f"{kind}_{d}"]) for d in dims}
            own = r["code"] + "@" + r["set"]
            dist = {n: l1(ind, targets[n]) for n in names}
            rank = 1 + sum(dist[n] < dist[own] for n in names if n != own)
            spec = sum(dist[n] for n in names if n != own) / (len(names) - 1) - dist[own]
            label = f"{r['optimizer']} {own}" if kind == "aligned" else f"naive (for {own})"
            print(f"| {label} | " + " | ".join(f"{'**' if n == own else ''}{dist[n]:.1f}{'**' if n == own else ''}" for n in names)
                  + f" | {rank} | {spec:+.1f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/experiments/paper/cells.csv")
