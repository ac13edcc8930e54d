"""Cost of position-debiased elicitation: `--order both` against `--order forward`, per fitness evaluation.

    python benchmarks/order.py [--population 4] [--tokens 8] [--repeats 3] [--threads 1] [--out benchmarks/order.json]

One evaluation is what the alignment objective does per batch: `Survey.distributions` on a population
of soft prompts. `forward` asks the 24 items once; `both` asks the forward and the reversed prompts
(48) in the same backend call and averages the two distributions. The two are timed alternately in
the same run (forward, both, forward, both, ...) after a warm-up of each, and the median of the repeats
is reported, with their ratio. A reversed-only evaluation of the same population checks that `both`
is the mean of the two orders on this model (largest difference). Writes a small JSON next to this
script (or to --out).
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from culturalign.backends import load_backend
from culturalign.display import quiet_libraries
from culturalign.measure.instrument import load_instrument
from culturalign.softprompt.params import embedding_std
from culturalign.measure.survey import Survey
from culturalign.measure.targets import load_target


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steady on a shared CPU)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("order.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()
    load_avg = os.getloadavg()[0]
    backend = load_backend(args.model)
    inst, target = load_instrument(), load_target("CN")
    surveys = {o: Survey(backend, inst, "naive", target, order=o) for o in ("forward", "reversed", "both")}
    g = torch.Generator().manual_seed(0)
    pop = torch.randn(args.population, args.tokens, backend.hidden_size, generator=g) * embedding_std(backend)
    times = {"forward": [], "both": []}
    with torch.no_grad():
        out = {o: surveys[o].distributions(pop) for o in ("forward", "both", "reversed")}  # warm-up, and the check
        for _ in range(args.repeats):
            for o in ("forward", "both"):
                times[o].append(timed(lambda: surveys[o].distributions(pop)))
    mean = (out["forward"].probs + out["reversed"].probs) / 2
    diff = (out["both"].probs - mean).abs().max().item()
    mass_diff = (out["both"].mass - (out["forward"].mass + out["reversed"].mass) / 2).abs().max().item()
    med = {o: statistics.median(t) for o, t in times.items()}
    ratio = med["both"] / med["forward"]
    tokens = {o: surveys[o].prompts.tokens_per_candidate + args.tokens for o in ("forward", "both")}
    result = {
        "benchmark": "order", "model": backend.name, "device": str(backend.device), "threads": args.threads,
        "population": args.population, "soft_tokens": args.tokens, "repeats": args.repeats,
        "load_average_at_start": round(load_avg, 2),
        "seconds_per_evaluation": {o: round(v, 3) for o, v in med.items()},
        "seconds_all": {o: [round(x, 3) for x in t] for o, t in times.items()},
        "candidates_per_second": {o: round(args.population / v, 3) for o, v in med.items()},
        "ratio_both_over_forward": round(ratio, 3),
        "prompts": {"forward": len(surveys["forward"].prompts), "both": len(surveys["both"].prompts)},
        "tokens_per_candidate": tokens,
        "max_abs_diff_both_vs_mean_of_orders": {"probs": diff, "mass": mass_diff},
    }
    print(f"population {args.population} x 24 items, soft prompt {args.tokens} tokens, {backend.name} on {backend.device}, "
          f"{args.threads} thread(s), load average {load_avg:.1f} at start")
    for o in ("forward", "both"):
        print(f"{o:8s} {med[o]:7.2f} s per evaluation ({args.population / med[o]:.3f} candidates/s, "
              f"{result['prompts'][o]} prompts, {tokens[o]} tokens/candidate)")
    print(f"both / forward: {ratio:.2f}x   max |p_both - (p_forward + p_reversed)/2| = {diff:.1e}")
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
