"""Adam (torch.optim.Adam): the white-box reference, one candidate and one gradient per step."""

from __future__ import annotations

import numpy as np
import torch

from culturalign.search.protocol import Evaluation, Optimizer


class Adam(Optimizer):
    """Gradient descent from x0 (z = 0 in a projection, or the initial prompt itself); one evaluation per step."""

    name = "adam"
    needs_gradient = True

    def __init__(self, dim: int, seed: int = 0, lr: float = 0.02, x0: np.ndarray | None = None):
        super().__init__(dim, seed)
        self.lr = lr
        start = torch.zeros(dim) if x0 is None else torch.as_tensor(np.asarray(x0, dtype=np.float32)).reshape(dim)
        self.x = start.clone().float().requires_grad_(True)
        self.opt = torch.optim.Adam([self.x], lr=lr)

    def ask(self) -> np.ndarray:
        return self.x.detach().double().numpy()[None, :].copy()

    def tell(self, X: np.ndarray, evaluation: Evaluation) -> None:
        if np.shape(X) != (1, self.dim):
            raise ValueError("adam: tell() must get the point of the last ask()")
        if evaluation.grad is None:
            raise ValueError("adam needs the gradient: call the objective with need_grad=True")
        self.opt.zero_grad()
        self.x.grad = torch.as_tensor(np.asarray(evaluation.grad, dtype=np.float32)).reshape(self.dim)
        self.opt.step()
        self.nfev += 1
        self.generation += 1

    def state_dict(self) -> dict:
        st = self.opt.state.get(self.x)
        return {"dim": self.dim, "lr": self.lr, "nfev": self.nfev, "x": self.x.detach().tolist(),
                "adam": None if not st else {"step": float(st["step"]), "exp_avg": st["exp_avg"].tolist(),
                                             "exp_avg_sq": st["exp_avg_sq"].tolist()}}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.x.copy_(torch.tensor(state["x"], dtype=torch.float32))
        self.nfev = self.generation = int(state["nfev"])
        st = state["adam"]
        self.opt.state.clear()
        if st is not None:
            self.opt.state[self.x] = {"step": torch.tensor(float(st["step"])),
                                      "exp_avg": torch.tensor(st["exp_avg"], dtype=torch.float32),
                                      "exp_avg_sq": torch.tensor(st["exp_avg_sq"], dtype=torch.float32)}
