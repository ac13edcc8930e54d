#!/usr/bin/env bash
# Issue 13, part 7: rebuild the expert registry with a culture-rewarding objective and measure it.
# Resumable: each step skips what is done (experts build keeps finished experts; the evaluations rerun).
#   1. the registry: Adam (the black-box methods do not reach its quality: China 254.8 for sgn, 229.2 for DE,
#      against 57.0 for Adam on the full prompt) for 16 steps, as the shipped registry, plus --contrast 0.5;
#   2. benchmarks/specificity.py on it (own expert, other experts, naive, uniform on the held-out paraphrases);
#   3. culturalign committee eval on it.
set -u
cd "$(dirname "$0")/../.."
reg=${REG:-runs/registry-contrast}
culturalign experts build --countries CN,US,IN,SA@hofstede-2023,DE,BR,JP,MA --optimizer adam --budget 16 \
  --contrast 0.5 --out "$reg" || exit $?
python benchmarks/specificity.py --registry "$reg" --out benchmarks/experts/specificity-contrast.json || exit $?
culturalign committee eval --experts "$reg" --out runs/committee-eval-contrast || exit $?
