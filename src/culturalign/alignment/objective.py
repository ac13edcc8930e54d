"""The alignment objective: candidates -> prompts -> one full survey each -> an `Evaluation`.

`SurveyObjective` binds a `Survey` (model, instrument, prompt profile, target) and a parameterisation
(a `Projection` z -> p0 + A z, or the full prompt flattened). One call evaluates a batch in one
`Backend.option_distributions` pass and returns the loss (L1 on the target's known dimensions plus the
option-mass penalty), the signed index residuals, the option mass and, when asked, the gradient
with respect to the candidates (through the projection when there is one).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from culturalign.errors import CulturalignError
from culturalign.search.protocol import Evaluation
from culturalign.measure.survey import Survey


ANCHOR_TEXT = "data/capability/anchor.txt"  # inside the culturalign package


class CapabilityPenalty:
    """Keeps general language ability: `weight * max(0, NLL_with - NLL_without - log(max_ratio))` per candidate.

    NLL is the mean negative log-likelihood per token (nats) of a short neutral anchor text scored after the
    soft prompt, as the held-out perplexity check scores its own (different) text: the penalty starts once the
    anchor's perplexity ratio (with / without the prompt) passes `max_ratio`. One `Backend.loglikelihood`
    batch per evaluation, differentiable when the caller needs gradients.
    """

    def __init__(self, backend, max_ratio: float = 1.5, weight: float = 100.0, text: str | None = None):
        from importlib import resources

        from culturalign.heldout.perplexity import start_token

        if text is None:
            text = resources.files("culturalign").joinpath(ANCHOR_TEXT).read_text("utf-8")
        self.backend, self.max_ratio, self.weight = backend, max_ratio, weight
        self.ids = backend.tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        self.start = [start_token(backend.tokenizer)]
        with torch.no_grad():
            self.base = float(self.nll([None])[0])

    def nll(self, rows) -> torch.Tensor:
        from culturalign.backends import LoglikelihoodRequest

        lps = self.backend.loglikelihood([LoglikelihoodRequest(self.start, self.ids, s) for s in rows])
        return torch.stack([-lp.float().mean() for lp in lps])

    def __call__(self, prompts: torch.Tensor) -> torch.Tensor:
        """[P] penalty for [P, n, hidden] prompts."""
        excess = self.nll(list(prompts)) - self.base - math.log(self.max_ratio)
        return self.weight * torch.relu(excess)


class ContrastTerm:
    """Rewards the culture rather than any push away from the naive profile: `-weight * mean_j L1(indices, other_j)`.

    With C = 0 every published score is positive while the model's indices sit near 0, so any move away from
    zero lowers the L1 to *every* culture. Subtracting the mean L1 to the other cultures of the target's set
    cancels that shared part: with weight 1 the loss is minus the prompt's specificity. The L1 to each other
    culture is taken over the target's known dimensions; cultures lacking one of them are left out.
    """

    def __init__(self, loss_mask: torch.Tensor, others: list, dims: list[str], weight: float = 0.5):
        known = [d for d, k in zip(dims, loss_mask.tolist()) if k]
        rows = [[o.scores.get(d, 0.0) for d in dims] for o in others if all(d in o.scores for d in known)]
        if not rows:
            raise CulturalignError("--contrast needs other cultures in the target's set with the same dimensions")
        self.others = torch.tensor(rows, dtype=torch.float32)  # [T, n_indices]
        self.mask, self.weight = loss_mask, weight

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        """[P] the term for [P, n_indices] index scores."""
        d = ((indices[:, None, :] - self.others.to(indices.device)[None]).abs() * self.mask.to(indices.device)).sum(-1)
        return -self.weight * d.mean(-1)


class SurveyObjective:
    """`objective(X, need_grad)` for the search loop; `param` maps [P, dim] candidates to [P, n, hidden] prompts."""

    def __init__(self, survey: Survey, param, mass_floor: float = 0.0, mass_weight: float = 0.0,
                 capability: CapabilityPenalty | None = None, contrast: ContrastTerm | None = None):
        self.survey, self.param, self.capability, self.contrast = survey, param, capability, contrast
        self.dim = param.dim
        self.mass_floor, self.mass_weight = mass_floor, mass_weight
        self.dims = [d for d, known in zip(survey.instrument.dims, survey.loss_mask.tolist()) if known]

    def __call__(self, X: np.ndarray, need_grad: bool = False) -> Evaluation:
        sv = self.survey
        x = torch.as_tensor(np.asarray(X), dtype=torch.float32)
        if need_grad:
            x = x.clone().requires_grad_(True)
        with torch.set_grad_enabled(need_grad):
            prompts = self.param(x)
            d = sv.distributions(prompts)
            loss = sv.loss(d, self.mass_floor, self.mass_weight)
            if self.capability is not None:
                loss = loss + self.capability(prompts)
            if self.contrast is not None:
                loss = loss + self.contrast(sv.indices(d))
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
