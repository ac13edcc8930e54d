"""One markdown row per `culturalign heldout --json` file: the L1 without and with the prompt on the original items,
the share of that gain kept on each variant, MCQ accuracy and the perplexity ratio.

    python benchmarks/heldout_table.py benchmarks/experiments/paper/heldout-both/*.json
"""

import json
import sys
from pathlib import Path


def row(path: Path) -> str:
    d = json.loads(path.read_text())
    orig = d["survey"]["original"]
    kept = {v["instrument"]: v["kept"] for v in d["survey"]["variants"]}
    cells = [path.stem, d["order"], f"{orig['without']['l1']:.1f}", f"{orig['with']['l1']:.1f}", f"{orig['gain']:.1f}"]
    cells += [f"{k:.2f}" if k is not None else "-" for k in kept.values()]
    cells += [f"{d['mcq']['without']['accuracy']:.3f} → {d['mcq']['with']['accuracy']:.3f}", f"×{d['perplexity']['ratio']:.2f}"]
    return "| " + " | ".join(cells) + " |", list(kept)


def main(paths: list[str]) -> None:
    if not paths:
        sys.exit("usage: python benchmarks/heldout_table.py HELDOUT.json ...")
    rows = [row(Path(p)) for p in paths]
    variants = rows[0][1]
    print("| prompt | order | L1 without | L1 with | gain | " + " | ".join(f"kept {v}" for v in variants)
          + " | MCQ without → with | perplexity ratio |")
    print("|---|---|---:|---:|---:|" + "---:|" * len(variants) + "---:|---:|")
    for text, _ in rows:
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
