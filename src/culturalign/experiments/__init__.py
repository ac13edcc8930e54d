"""Experiment grids: targets x optimizers x seeds, each cell an `align` run (`culturalign experiment CONFIG`).

    spec.py       the YAML/TOML file, checked and resolved into cells (`load_spec`)
    runner.py     the experiment folder: plan (skip / resume / extend), run, tidy rows (`run_experiment`)
    executors.py  where cells run: `LocalExecutor` (one process) or `RayExecutor` (Ray tasks; Ray optional)
    report.py     cells.csv, curves.csv, convergence plots and report.md
"""

from culturalign.experiments.runner import plan, run_experiment
from culturalign.experiments.spec import Cell, Experiment, load_spec

__all__ = ["Cell", "Experiment", "load_spec", "plan", "run_experiment"]
