"""The alignment objective: candidates -> prompts -> one full survey each -> an `Evaluation`.

`SurveyObjective` binds a `Survey` (model, instrument, prompt profile, target) and a parameterisation
(a `Projection` z -> p0 + A z, or the full prompt flattened). One call evaluates a batch in one
`Backend.option_distributions` pass and returns the loss (L1 on the target's known dimensions plus the
option-mass penalty), the signed index residuals, the option mass and, when asked, the gradient
with respect to the candidates (through the projection when there is one).
"""

from __future__ import annotations

import numpy as np
import torch

from culturalign.search.protocol import Evaluation
from culturalign.survey import Survey


class FullPrompt:
    """The identity parameterisation: x is the prompt [n, hidden] flattened."""

    def __init__(self, p0: torch.Tensor):
        self.p0, self.shape, self.dim = p0.float(), tuple(p0.shape), p0.numel()

    def __call__(self, x) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=torch.float32)
        return x.reshape(-1, *self.shape)

    def x0(self) -> np.ndarray:
        return self.p0.flatten().double().numpy()


class SurveyObjective:
    """`objective(X, need_grad)` for the search loop; `param` maps [P, dim] candidates to [P, n, hidden] prompts."""

    def __init__(self, survey: Survey, param, mass_floor: float = 0.0, mass_weight: float = 0.0):
        self.survey, self.param = survey, param
        self.dim = param.dim
        self.mass_floor, self.mass_weight = mass_floor, mass_weight
        self.dims = [d for d, known in zip(survey.instrument.dims, survey.loss_mask.tolist()) if known]

    def __call__(self, X: np.ndarray, need_grad: bool = False) -> Evaluation:
        sv = self.survey
        x = torch.as_tensor(np.asarray(X), dtype=torch.float32)
        if need_grad:
            x = x.clone().requires_grad_(True)
        with torch.set_grad_enabled(need_grad):
            d = sv.distributions(self.param(x))
            loss = sv.loss(d, self.mass_floor, self.mass_weight)
            grad = None
            if need_grad:
                (g,) = torch.autograd.grad(loss.sum(), x)
                grad = g.double().numpy()
        with torch.no_grad():
            ind = sv.indices(d).detach()
            res = (ind - sv.target_vec)[:, sv.loss_mask]
        return Evaluation(loss=loss.detach().double().cpu().numpy(), residuals=res.double().cpu().numpy(),
                          mass=d.mass.detach().double().mean(-1).cpu().numpy(),
                          l1=res.abs().sum(-1).double().cpu().numpy(), grad=grad)
