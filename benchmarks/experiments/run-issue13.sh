#!/usr/bin/env bash
# The measurements behind the README's issue-13 results, one grid after the other (one heavy job on 2 cores).
# Each grid resumes where it stopped: run this script again after an interruption. Small outputs (cells.csv,
# curves.csv, report.md, experiment.json, plots, each cell's heldout.json) are copied to benchmarks/experiments/<name>.
set -u
cd "$(dirname "$0")/../.."
for name in ${@:-china-seeds china-order china-sgn china-sgn-seeds china-contrast china-de-bounded paper}; do
  .venv/bin/culturalign experiment "experiments/$name.yaml" --heldout --out "runs/experiments/$name" || exit $?
  dest="benchmarks/experiments/$name"
  mkdir -p "$dest/heldout"
  cp -r "runs/experiments/$name/"{cells.csv,curves.csv,report.md,experiment.json,plots} "$dest/"
  for cell in "runs/experiments/$name/cells/"*/; do
    [ -f "$cell/heldout.json" ] && cp "$cell/heldout.json" "$dest/heldout/$(basename "$cell").json"
  done
done
