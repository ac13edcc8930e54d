"""Search: one ask/tell `Optimizer` protocol, one `minimize` loop, and the methods behind it.

The stage of the pipeline that moves the soft prompt: `registry` holds one table of the methods (what
`--optimizer` accepts, and every fact `AlignConfig` needs about each); `protocol` the ask/tell interface and
the `Evaluation` an objective returns; `loop` the one `minimize` loop (checkpoints, budget, replay-resume).

| name            | engine                    | reads             | resumes mid-run |
|-----------------|---------------------------|-------------------|-----------------|
| `de`            | own DE (the paper's)      | loss              | native state    |
| `cmaes`         | pycma                     | loss              | replay          |
| `dfols`         | DFO-LS                    | index residuals   | replay          |
| `random`        | uniform in the box        | loss              | native state    |
| `sgn`           | own subspace Gauss-Newton | index residuals   | native state    |
| `adam`          | torch Adam, full prompt   | loss + gradient   | native state    |
| `adam-subspace` | torch Adam on z (p0 + Az) | loss + gradient   | native state    |

The black-box methods search z in [-bound, bound]^d; `adam` descends the full prompt (the white-box
reference) and `adam-subspace` descends z through the same projection the black-box methods search,
which measures what the subspace can reach at all.

The names below are imported on first use (`from culturalign.search import DifferentialEvolution`), so that
`culturalign.search.registry` stays light to import.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "Adam": "adam", "CMAES": "cmaes", "DEConfig": "de", "DifferentialEvolution": "de", "minimize_de": "de",
    "DFOLS": "dfols", "LoopState": "loop", "minimize": "loop", "Evaluation": "protocol", "Objective": "protocol",
    "Optimizer": "protocol", "ReplayOptimizer": "protocol", "RandomSearch": "random", "SGNConfig": "sgn",
    "SubspaceGaussNewton": "sgn", "OPTIMIZERS_TABLE": "registry", "OptimizerEntry": "registry",
    "get_optimizer": "registry", "register_optimizer": "registry",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"culturalign.search.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'culturalign.search' has no attribute {name!r}")
