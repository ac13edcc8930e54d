"""Committee latency on Likert queries, measured in one run against the base model and a plain loop.

    python benchmarks/committee.py [--queries 12] [--repeats 3] [--experts DIR]

For each of the first N value questions with options in the shipped query set, asked as a user
of each registry culture in turn:
- base:      the base model alone (`Committee.ask(system="naive")`);
- committee: routing + the routed experts' distributions in ONE forward batch whose rows carry
             different soft prompts + the weighted mixture (`Committee.ask`);
- all experts, batched vs one after another: every registry expert answers the query, once as one
  mixed batch (`Backend.option_distributions` with a soft prompt per row) and once as E separate
  calls (the plain way). Both must give the same distributions.

Prints median latencies, the committee-to-base ratio, and the speed-up of the mixed batch. On a
2-core CPU the compute grows with the rows, so batching mainly saves per-call overhead; on a GPU the
rows run in parallel and the batch costs about one row's time.
"""

import argparse
import statistics
import time

import torch

from culturalign.backends import load_backend
from culturalign.committee.compose import load_committee
from culturalign.committee.queries import load_queries
from culturalign.display import quiet_libraries
from culturalign.measure.instrument import Item
from culturalign.measure.prompts import encode_prompts


def timed(fn, repeats):
    out, best = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best.append(time.perf_counter() - t)
    return out, min(best)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--experts", default=None)
    ap.add_argument("--queries", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    quiet_libraries()
    backend = load_backend(args.model)
    c = load_committee(backend, args.experts)
    codes = c.registry.codes
    soft = [c.registry[k].embeddings for k in codes]
    qs = [q for q in load_queries() if q.has_options and q.culture_dependent][: args.queries]
    c.ask(qs[0].text, culture=codes[0], options=list(qs[0].options))  # warm-up: encoder, caches
    base_t, comm_t, batch_t, loop_t, rows, diff = [], [], [], [], [], 0.0
    with torch.no_grad():
        for k, q in enumerate(qs):
            user = q.culture or codes[k % len(codes)]
            opts = list(q.options)
            _, t = timed(lambda: c.ask(q.text, culture=user, options=opts, system="naive"), args.repeats)
            base_t.append(t)
            a, t = timed(lambda: c.ask(q.text, culture=user, options=opts, system="committee"), args.repeats)
            comm_t.append(t)
            rows.append(len(a.experts))
            seqs, option_ids = encode_prompts(backend.tokenizer, [Item(0, q.text, tuple(opts))],
                                              tuple(range(1, len(opts) + 1)), None)
            ps = backend.prompt_set(seqs)
            batched, t = timed(lambda: backend.option_distributions(ps, option_ids, soft=soft), args.repeats)
            batch_t.append(t)
            looped, t = timed(lambda: [backend.option_distributions(ps, option_ids, soft=[s]) for s in soft], args.repeats)
            loop_t.append(t)
            for i, d in enumerate(looped):
                diff = max(diff, (d.probs[0] - batched.probs[i]).abs().max().item())
    med = statistics.median
    print(f"{len(qs)} Likert/choice queries, {len(codes)} experts ({', '.join(codes)}), {backend.name} on {backend.device}, "
          f"best of {args.repeats}")
    print(f"base model:            p50 {med(base_t) * 1000:7.1f} ms/query")
    print(f"committee:             p50 {med(comm_t) * 1000:7.1f} ms/query  ({statistics.fmean(rows):.2f} experts/query)"
          f"  -> {med(comm_t) / med(base_t):.2f}x the base model")
    print(f"all {len(codes)} experts, batched: p50 {med(batch_t) * 1000:7.1f} ms/query")
    print(f"all {len(codes)} experts, one by one: p50 {med(loop_t) * 1000:7.1f} ms/query")
    print(f"speed-up of the mixed-expert batch: {med(loop_t) / med(batch_t):.2f}x   "
          f"max |p_batch - p_alone| = {diff:.2e} ({'OK' if diff <= 1e-4 else 'MISMATCH'})")
    if diff > 1e-4:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
