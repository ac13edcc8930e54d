"""Time one full 24-item VSM 2013 survey on the embedded model (logprob mode, batched, shared prefixes).

    python benchmarks/survey.py [--model smollm2-135m] [--repeats 3]

Prints, per prompt profile, the median wall time of one survey, the tokens the model processed,
and the tokens a plain implementation (each item as its own full sequence) would process.
"""

import argparse
import statistics
import time

import torch

from culturalign.backends import load_backend
from culturalign.display import quiet_libraries
from culturalign.measure.instrument import load_instrument
from culturalign.measure.survey import Survey
from culturalign.measure.targets import load_target


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--country", default="CN")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    quiet_libraries()
    t0 = time.perf_counter()
    backend = load_backend(args.model)
    print(f"model {backend.name} loaded in {time.perf_counter() - t0:.1f} s on {backend.device} ({backend.dtype}), "
          f"{torch.get_num_threads()} threads")
    inst, target = load_instrument(), load_target(args.country)
    print(f"{'profile':8} {'seconds':>8} {'tokens':>7} {'plain tokens':>13} {'option mass':>12}")
    for profile in ("naive", "persona", "icl"):
        s = Survey(backend, inst, profile, target)
        s.result()  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            r = s.result()
            times.append(time.perf_counter() - t)
        print(f"{profile:8} {statistics.median(times):8.2f} {s.prompts.tokens_per_candidate:7d} "
              f"{s.prompts.plain_tokens_per_candidate:13d} {r.mean_option_mass:12.3f}")


if __name__ == "__main__":
    main()
