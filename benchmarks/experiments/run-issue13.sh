#!/usr/bin/env bash
# The measurements behind the README's issue-13 results, one after the other (one heavy job on 2 cores).
# Each grid resumes where it stopped: run this script again after an interruption.
set -u
cd "$(dirname "$0")/../.."
for name in china-seeds china-order china-sgn; do
  .venv/bin/culturalign experiment "experiments/$name.yaml" --heldout --out "runs/experiments/$name" || exit $?
  mkdir -p "benchmarks/experiments/$name"
  cp -r "runs/experiments/$name/"{cells.csv,curves.csv,report.md,experiment.json,plots} "benchmarks/experiments/$name/" 2>/dev/null
  mkdir -p "benchmarks/experiments/$name/heldout"
  cp runs/experiments/$name/cells/*/heldout.json "benchmarks/experiments/$name/heldout/" 2>/dev/null || true
done
