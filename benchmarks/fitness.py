"""Fitness evaluation speed: culturalign's evaluator against the plain one, in the same run.

    python benchmarks/fitness.py [--population 16] [--tokens 8] [--prompt naive] [--repeats 3]

Both evaluate the same population of random soft prompts (each candidate = one full 24-item
survey). Plain: every item as its full sequence (soft prompt + template + item), full logits.
culturalign: root / section prefixes computed once per candidate and their KV caches shared,
only the last position's logits. Each evaluator is timed `--repeats` times, alternating (A B B A A B ...,
after one warm-up each), so that a change in the machine's load falls on both; printed: candidate
evaluations per second for both (from the median time, with the range over repeats), the
speed-up (ratio of medians, with the range of the per-pair ratios), and the largest difference
between the two sets of answer distributions (must be <= 1e-4).
"""

import argparse
import statistics
import time

import torch

from culturalign.backends import load_backend
from culturalign.backends.hf import plain_option_distributions
from culturalign.display import quiet_libraries
from culturalign.measure.instrument import load_instrument
from culturalign.softprompt.params import embedding_std
from culturalign.measure.survey import Survey
from culturalign.measure.targets import load_target


def spread(times: list[float]) -> str:
    """median [min-max] of a list of numbers."""
    return f"{statistics.median(times):.3f} [{min(times):.3f}-{max(times):.3f}]"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt", default="naive")
    ap.add_argument("--repeats", type=int, default=3, help="timings per evaluator, alternating between them")
    args = ap.parse_args()
    quiet_libraries()
    backend = load_backend(args.model)
    s = Survey(backend, load_instrument(), args.prompt, load_target("CN"))
    g = torch.Generator().manual_seed(0)
    pop = torch.randn(args.population, args.tokens, backend.hidden_size, generator=g) * embedding_std(backend)
    evaluators = {
        "culturalign": lambda: s.distributions(pop),
        "plain": lambda: plain_option_distributions(backend, s.sequences, s.option_ids, pop),
    }
    times = {name: [] for name in evaluators}
    out = {}
    with torch.no_grad():
        s.distributions(pop[:2])  # warm-up
        plain_option_distributions(backend, s.sequences, s.option_ids, pop[:1])
        for k in range(args.repeats):
            order = list(evaluators) if k % 2 == 0 else list(reversed(evaluators))  # ABBA: drifting load hits both
            for name in order:
                t = time.perf_counter()
                out[name] = evaluators[name]()
                times[name].append(time.perf_counter() - t)
    diff = (out["culturalign"].probs - out["plain"].probs).abs().max().item()
    ev = s.prompts
    rate = {name: [args.population / t for t in ts] for name, ts in times.items()}
    ratios = [p / f for p, f in zip(times["plain"], times["culturalign"])]  # the pair timed back to back
    print(f"population {args.population} x 24 items, soft prompt {args.tokens} tokens, prompt {args.prompt}, "
          f"{backend.name} on {backend.device}, {args.repeats} timings each, alternating; median [min-max]")
    print(f"plain:       {spread(rate['plain'])} candidates/s  ({ev.plain_tokens_per_candidate + 24 * args.tokens} "
          "tokens/candidate, full logits)")
    print(f"culturalign: {spread(rate['culturalign'])} candidates/s  ({ev.tokens_per_candidate + args.tokens} "
          "tokens/candidate, last-position logits)")
    print(f"speed-up: {statistics.median(times['plain']) / statistics.median(times['culturalign']):.2f}x (ratio of medians; "
          f"per pair {min(ratios):.2f}-{max(ratios):.2f}x)   max |p_fast - p_plain| = {diff:.2e} "
          f"({'OK' if diff <= 1e-4 else 'MISMATCH'})")
    if diff > 1e-4:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
