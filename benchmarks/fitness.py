"""Fitness evaluation speed: culturalign's evaluator against the plain one, in the same run.

    python benchmarks/fitness.py [--population 16] [--tokens 8] [--prompt naive]

Both evaluate the same population of random soft prompts (each candidate = one full 24-item
survey). Plain: every item as its full sequence (soft prompt + template + item), full logits.
culturalign: root / section prefixes computed once per candidate and their KV caches shared,
only the last position's logits. Prints candidate evaluations per second for both, their ratio,
and the largest difference between the two sets of answer distributions (must be <= 1e-4).
"""

import argparse
import time

import torch

from culturalign.backends import load_backend
from culturalign.backends.hf import plain_option_distributions
from culturalign.cli import _quiet_libraries
from culturalign.measure.instrument import load_instrument
from culturalign.softprompt.params import embedding_std
from culturalign.measure.survey import Survey
from culturalign.measure.targets import load_target


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--prompt", default="naive")
    args = ap.parse_args()
    _quiet_libraries()
    backend = load_backend(args.model)
    s = Survey(backend, load_instrument(), args.prompt, load_target("CN"))
    g = torch.Generator().manual_seed(0)
    pop = torch.randn(args.population, args.tokens, backend.hidden_size, generator=g) * embedding_std(backend)
    with torch.no_grad():
        s.distributions(pop[:2])  # warm-up
        plain_option_distributions(backend, s.sequences, s.option_ids, pop[:1])
        t = time.perf_counter()
        fast = s.distributions(pop)
        t_fast = time.perf_counter() - t
        t = time.perf_counter()
        plain = plain_option_distributions(backend, s.sequences, s.option_ids, pop)
        t_plain = time.perf_counter() - t
    diff = (fast.probs - plain.probs).abs().max().item()
    ev = s.prompts
    print(f"population {args.population} x 24 items, soft prompt {args.tokens} tokens, prompt {args.prompt}, {backend.name} on {backend.device}")
    print(f"plain:       {args.population / t_plain:6.3f} candidates/s  ({ev.plain_tokens_per_candidate + 24 * args.tokens} tokens/candidate, full logits)")
    print(f"culturalign: {args.population / t_fast:6.3f} candidates/s  ({ev.tokens_per_candidate + args.tokens} tokens/candidate, last-position logits)")
    print(f"speed-up: {t_plain / t_fast:.2f}x   max |p_fast - p_plain| = {diff:.2e} ({'OK' if diff <= 1e-4 else 'MISMATCH'})")
    if diff > 1e-4:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
