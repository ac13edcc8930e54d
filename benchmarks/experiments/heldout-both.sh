#!/usr/bin/env bash
# Held-out checks of the paper grid's (forward-searched) prompts, elicited with --order both: every item asked in
# both option orders in one batch and the two answer distributions averaged. Needs the grid's cells in
# runs/experiments/paper (bash benchmarks/experiments/run-issue13.sh paper). Skips cells already checked.
set -u
cd "$(dirname "$0")/../.."
dest=benchmarks/experiments/paper/heldout-both
mkdir -p "$dest"
for cell in runs/experiments/paper/cells/*/; do
  name=$(basename "$cell")
  [ -f "$dest/$name.json" ] && continue
  culturalign heldout --soft-prompt "$cell" --order both --json "$dest/$name.json" > /dev/null || exit $?
done
