"""Does a soft prompt start where the model's own tokens are? One sentence, four ways, one L1 each.

    python benchmarks/soft_prompt_check.py [--model gemma3-270m] [--country CN] [--text "You are a person from China."]

The naive survey against the country, with the sentence
  1. nowhere (the naive profile);
  2. as plain tokens at position 0, before every prompt's first token;
  3. as a soft prompt of its token embeddings, from `Backend.embed`;
  4. as a soft prompt from `initial_prompt(..., "text", sentence)`, what `align --init text` starts from.
2, 3 and 4 must agree (to float rounding); 1 shows the sentence matters. On a model that scales its embeddings
(Gemma: by sqrt(hidden)) 4 used to land near 1, because the initial prompt was built from unscaled weights.
"""

import argparse
import time

import torch

from culturalign.backends import Distributions, PromptSet, load_backend
from culturalign.display import quiet_libraries
from culturalign.measure.instrument import load_instrument
from culturalign.softprompt.params import initial_prompt
from culturalign.measure.survey import Survey
from culturalign.measure.targets import load_target


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--country", default="CN")
    ap.add_argument("--text", default="You are a person from China.")
    args = ap.parse_args()
    quiet_libraries()
    t0 = time.perf_counter()
    backend = load_backend(args.model)
    print(f"model {backend.name} loaded in {time.perf_counter() - t0:.1f} s on {backend.device} ({backend.dtype}); "
          f"embedding std {float(backend.embedding_table().std()):.4f}, attention window {backend.window}")
    inst = load_instrument()
    survey = Survey(backend, inst, "naive", load_target(args.country))
    ids = backend.tokenizer(args.text, add_special_tokens=False)["input_ids"]
    print(f"{args.text!r}: {len(ids)} tokens; the prompts start {backend.tokenizer.decode(survey.sequences[0][:4])!r}")
    as_tokens = PromptSet([ids + s for s in survey.sequences], survey.prompts.groups)
    with torch.no_grad():
        d = backend.option_distributions(as_tokens, survey.option_ids)
        rows = {
            "no prompt (naive)": survey.distributions(),
            "plain tokens at position 0": Distributions(inst.to_code_order(d.probs), d.mass),
            "soft prompt from embed()": survey.distributions(backend.embed(ids).unsqueeze(0)),
            "soft prompt from initial_prompt text": survey.distributions(
                initial_prompt(backend, len(ids), "text", args.text).unsqueeze(0)),
        }
    print(f"{'':38} {'L1':>9} {'option mass':>12}")
    for label, dist in rows.items():
        print(f"{label:38} {float(survey.loss(dist)[0]):9.4f} {float(dist.mass.mean()):12.4f}")


if __name__ == "__main__":
    main()
