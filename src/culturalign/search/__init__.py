"""Search: one ask/tell `Optimizer` protocol, one `minimize` loop, and the methods behind it.

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
"""

from culturalign.search.adam import Adam
from culturalign.search.cmaes import CMAES
from culturalign.search.de import DE, DEConfig, DifferentialEvolution, minimize_de
from culturalign.search.dfols import DFOLS
from culturalign.search.loop import LoopState, minimize
from culturalign.search.protocol import Evaluation, Objective, Optimizer, ReplayOptimizer
from culturalign.search.random import RandomSearch
from culturalign.search.sgn import SGNConfig, SubspaceGaussNewton

from culturalign.config import OPTIMIZERS  # noqa: E402
BLACK_BOX = ("de", "sgn", "cmaes", "dfols", "random")
GRADIENT = ("adam", "adam-subspace")

__all__ = ["Adam", "CMAES", "DE", "DEConfig", "DFOLS", "DifferentialEvolution", "Evaluation", "LoopState", "Objective",
           "Optimizer", "OPTIMIZERS", "BLACK_BOX", "GRADIENT", "RandomSearch", "ReplayOptimizer", "SGNConfig", "SubspaceGaussNewton", "minimize",
           "minimize_de"]
