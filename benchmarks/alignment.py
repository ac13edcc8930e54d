"""Alignment benchmark: naive vs icl vs aligned L1 for the paper's four countries.

    python benchmarks/alignment.py [--optimizer NAME] [--budget N] [--seed N] [--set FIELD=VALUE ...]
                                   [--out runs/bench] [--countries CN,US,IN,SA]

Runs `culturalign align` with the default settings (plus any options given here; `--set` takes any
AlignConfig field, e.g. `--set sigma=10 --set basis=gaussian`) for China, the
United States and India (hofstede-2015) and Saudi Arabia (hofstede-2023: the 2015 release has only
its LTO and IVR), one after another on the embedded model, and prints a Markdown table: L1 of the
naive, icl and aligned profiles, the aligned/naive ratio, evaluations and wall time. Each run keeps
its folder (soft prompt, result.json, report.md, plots); an interrupted benchmark resumes.
"""

import argparse
import json
import time
from pathlib import Path

from culturalign.alignment.config import AlignConfig
from culturalign.alignment.run import Aligner
from culturalign.backends import load_backend
from culturalign.display import quiet_libraries
from culturalign.measure.instrument import load_instrument
from culturalign.measure.targets import load_target

CASES = {"CN": "hofstede-2015", "US": "hofstede-2015", "IN": "hofstede-2015", "SA": "hofstede-2023"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--optimizer", default=AlignConfig().optimizer)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="any AlignConfig field")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--countries", default=",".join(CASES))
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in AlignConfig.__dataclass_fields__ or not value:
            ap.error(f"--set {item!r}: expected FIELD=VALUE with a field of AlignConfig")
        kind = type(getattr(AlignConfig(), key))
        overrides[key] = kind(value) if kind in (int, float, str) else value
    quiet_libraries()
    backend, inst = load_backend(args.model), load_instrument()
    rows = []
    for code in args.countries.split(","):
        target = load_target(code, CASES.get(code, "hofstede-2015"))
        budget = {"budget": args.budget} if args.budget else {}
        cfg = AlignConfig(optimizer=args.optimizer, seed=args.seed, **overrides, **budget)
        tag = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
        out = Path(args.out) / f"{code}-{args.optimizer}{tag}-s{args.seed}"
        t0 = time.perf_counter()
        if (out / "result.json").exists() and not (out / "checkpoint.json").exists():
            result = json.loads((out / "result.json").read_text())
        else:
            result = Aligner(backend, inst, target, cfg, out, resume=(out / "checkpoint.json").exists(), progress=lambda i: print(
                f"  {code} {i['evaluations']:4d}/{i['budget']} evals  best {i['best_loss']:.1f}", flush=True)).run()
        p = result["profiles"]
        rows.append((target.name, target.set_name, p["naive"]["l1"], p["icl"]["l1"], p["aligned"]["l1"],
                     result["evaluations"], time.perf_counter() - t0))
        print(f"done {target.name}: naive {p['naive']['l1']:.1f}, icl {p['icl']['l1']:.1f}, aligned {p['aligned']['l1']:.1f}", flush=True)
    print(f"\n{args.optimizer}, seed {args.seed}, model {backend.name}")
    print("| target | set | naive L1 | icl L1 | aligned L1 | aligned / naive | evaluations | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, tset, n, i, a, ev, sec in rows:
        print(f"| {name} | {tset} | {n:.1f} | {i:.1f} | {a:.1f} | {a / n:.2f} | {ev} | {sec:.0f} |")


if __name__ == "__main__":
    main()
