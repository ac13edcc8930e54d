"""Align a frozen model to a target culture: search a soft prompt, then measure and report it.

One run = one output folder:
    adapter_config.json, adapter_model.safetensors, culturalign.json   the soft prompt (PEFT format)
    result.json        settings, naive / icl / aligned profiles (survey schema), per-generation history
    report.md, radar.png, convergence.png
    checkpoint.json    optimiser state after every generation (atomic); `resume=True` continues it

The objective is `Survey.loss`: the L1 distance of the six indices (on the target's known dimensions)
plus an option-mass penalty. DE searches z in [-b, b]^d with prompt = p0 + A z (`Projection`); Adam
descends the full prompt. Each candidate evaluation is one full survey; the budget counts them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from culturalign.backends import Backend
from culturalign.errors import CulturalignError
from culturalign.files import atomic_write_json
from culturalign.instrument import Instrument
from culturalign.optimizers import DEConfig, DifferentialEvolution
from culturalign.prompts import system_text
from culturalign.softprompt import INITS, Projection, SoftPrompt, embedding_std, initial_prompt
from culturalign.survey import Survey
from culturalign.targets import Target

OPTIMIZERS = ("de", "adam")
CHECKPOINT = "checkpoint.json"


@dataclass
class AlignConfig:
    optimizer: str = "de"
    budget: int = 160  # candidate evaluations (full surveys)
    tokens: int = 32  # soft prompt length n
    dim: int = 16  # DE search dimension d (z), n*hidden for no projection
    seed: int = 0
    projection_seed: int | None = None  # default: seed
    init: str = "text"
    init_text: str | None = None  # default: the persona sentence for the target
    prompt: str = "naive"  # profile the soft prompt is prepended to
    popsize: int = 6
    mutation: float | tuple[float, float] = (0.5, 1.0)
    crossover: float = 0.9
    strategy: str = "best1bin"
    bound: float = 1.0
    sigma: float = 40.0  # std of A z per coordinate, in embedding stds (see README, measured choice)
    lr: float = 0.02  # adam
    mass_floor: float = 0.5
    mass_weight: float = 100.0
    constants: dict[str, float] = field(default_factory=dict)

    def validate(self) -> "AlignConfig":
        if self.optimizer not in OPTIMIZERS:
            raise CulturalignError(f"--optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if self.init not in INITS:
            raise CulturalignError(f"--init {self.init!r}: expected one of {', '.join(INITS)}")
        if self.optimizer == "de":
            self.de_config()
            if self.budget < 2 * self.popsize:
                raise CulturalignError(
                    f"--budget {self.budget} is too small for a population of {self.popsize}: "
                    f"need at least {2 * self.popsize} evaluations (initial population + one generation)"
                )
        if self.budget < 1:
            raise CulturalignError(f"--budget must be positive, got {self.budget}")
        if self.tokens < 1:
            raise CulturalignError(f"--tokens must be at least 1, got {self.tokens}")
        if self.lr <= 0:
            raise CulturalignError(f"--lr must be positive, got {self.lr}")
        return self

    def de_config(self) -> DEConfig:
        return DEConfig(self.popsize, self.mutation, self.crossover, self.strategy, self.bound).validate()

    @property
    def proj_seed(self) -> int:
        return self.seed if self.projection_seed is None else self.projection_seed


def _fingerprint(cfg: AlignConfig, backend: Backend, target: Target, instrument: Instrument) -> dict:
    return {"config": json.loads(json.dumps(asdict(cfg))), "model": backend.name, "target": target.to_json(),
            "instrument": instrument.id}


class Aligner:
    """Runs one alignment; `run()` returns the result dict also written to `out/result.json`."""

    def __init__(self, backend: Backend, instrument: Instrument, target: Target, config: AlignConfig, out: str | Path,
                 resume: bool = False, progress: Callable[[dict], None] | None = None):
        self.backend, self.instrument, self.target, self.cfg = backend, instrument, target, config.validate()
        self.out, self.resume, self.progress = Path(out), resume, progress or (lambda info: None)
        self.survey = Survey(backend, instrument, config.prompt, target, config.constants)
        self.fingerprint = _fingerprint(config, backend, target, instrument)
        self.profiles: list = []  # naive, icl, aligned SurveyResults once `run()` has finished

    # -- set-up -------------------------------------------------------------------------------
    def _prepare_out(self) -> dict | None:
        ckpt = self.out / CHECKPOINT
        if self.out.exists() and not self.out.is_dir():
            raise CulturalignError(f"--out {str(self.out)!r} exists and is not a folder")
        if ckpt.exists() or (self.out / "result.json").exists():
            if not self.resume:
                raise CulturalignError(
                    f"{self.out} already holds a run; pass --resume to continue it, or choose another --out"
                )
            if not ckpt.exists():
                raise CulturalignError(f"{self.out} holds a finished run (result.json) and no checkpoint to resume")
            state = json.loads(ckpt.read_text())
            if state.get("fingerprint") != self.fingerprint:
                old, new = state.get("fingerprint", {}), self.fingerprint
                diff = [k for k in new["config"] if old.get("config", {}).get(k) != new["config"][k]]
                diff += [k for k in ("model", "target", "instrument") if old.get(k) != new[k]]
                raise CulturalignError(
                    f"cannot resume {self.out}: its run used different settings ({', '.join(diff) or 'format'}); "
                    "rerun with the same options, or choose another --out"
                )
            return state
        self.out.mkdir(parents=True, exist_ok=True)
        return None

    def _p0(self) -> torch.Tensor:
        text = self.cfg.init_text or system_text("persona", self.target).split(". ")[0] + "."
        return initial_prompt(self.backend, self.cfg.tokens, self.cfg.init, text, self.cfg.seed)

    def _evaluate(self, prompts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            d = self.survey.distributions(prompts)
            loss = self.survey.loss(d, self.cfg.mass_floor, self.cfg.mass_weight)
        return loss.double().cpu().numpy(), d.mass.double().mean(-1).cpu().numpy()

    # -- optimisers -----------------------------------------------------------------------------
    def _run_de(self, state: dict | None, p0: torch.Tensor, t_start: float) -> tuple[torch.Tensor, list]:
        cfg = self.cfg
        proj = Projection(p0, cfg.dim, cfg.proj_seed, embedding_std(self.backend), cfg.bound, cfg.sigma)
        if state:
            de, history = DifferentialEvolution.from_state(state["optimizer_state"]), state["history"]
        else:
            de, history = DifferentialEvolution(proj.dim, cfg.de_config(), cfg.seed), []
        while de.nfev + cfg.popsize <= cfg.budget:
            z = de.ask()
            loss, mass = self._evaluate(proj(z))
            de.tell(loss)
            history.append({"generation": de.generation, "evaluations": de.nfev, "best_loss": de.best[1],
                            "mean_loss": float(np.mean(de.fitness)), "best_option_mass": float(mass[np.argmin(loss)]),
                            "seconds": round(time.perf_counter() - t_start, 2)})
            atomic_write_json(self.out / CHECKPOINT, {"fingerprint": self.fingerprint, "optimizer_state": de.state_dict(),
                                                 "history": history})
            self.progress({**history[-1], "budget": cfg.budget})
        return proj(de.best[0])[0], history

    def _run_adam(self, state: dict | None, p0: torch.Tensor, t_start: float) -> tuple[torch.Tensor, list]:
        cfg = self.cfg
        prompt = p0.clone().requires_grad_(True)
        opt = torch.optim.Adam([prompt], lr=cfg.lr)
        history, best, best_loss = [], p0.clone(), float("inf")
        if state:
            s = state["optimizer_state"]
            with torch.no_grad():
                prompt.copy_(torch.tensor(s["prompt"]))
            best, best_loss, history = torch.tensor(s["best"]), s["best_loss"], state["history"]
            if s["adam"] is not None:
                st = s["adam"]
                opt.state[prompt] = {"step": torch.tensor(float(st["step"])), "exp_avg": torch.tensor(st["exp_avg"]),
                                     "exp_avg_sq": torch.tensor(st["exp_avg_sq"])}
        while len(history) < cfg.budget:
            d = self.survey.distributions(prompt.unsqueeze(0))
            loss = self.survey.loss(d, cfg.mass_floor, cfg.mass_weight)[0]
            value = loss.detach().item()
            if value < best_loss:  # the prompt that was just evaluated
                best, best_loss = prompt.detach().clone(), value
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append({"generation": len(history) + 1, "evaluations": len(history) + 1, "best_loss": best_loss,
                            "mean_loss": value, "best_option_mass": float(d.mass.detach().mean()),
                            "seconds": round(time.perf_counter() - t_start, 2)})
            st = opt.state[prompt]
            atomic_write_json(self.out / CHECKPOINT, {"fingerprint": self.fingerprint, "history": history, "optimizer_state": {
                "prompt": prompt.detach().tolist(), "best": best.tolist(), "best_loss": best_loss,
                "adam": {"step": float(st["step"]), "exp_avg": st["exp_avg"].tolist(), "exp_avg_sq": st["exp_avg_sq"].tolist()},
            }})
            self.progress({**history[-1], "budget": cfg.budget})
        return best, history

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        from culturalign.reports import write_report

        state = self._prepare_out()
        t0 = time.perf_counter()
        torch.manual_seed(self.cfg.seed)
        p0 = self._p0()
        run = self._run_de if self.cfg.optimizer == "de" else self._run_adam
        best, history = run(state, p0, t0)
        search_seconds = time.perf_counter() - t0
        meta = {"prompt": self.cfg.prompt, "instrument": self.instrument.id, "model": self.backend.name,
                "target": self.target.to_json(), "optimizer": self.cfg.optimizer, "best_loss": history[-1]["best_loss"]}
        SoftPrompt(best, meta).save(self.out, self.backend.name, self.backend)
        naive = Survey(self.backend, self.instrument, "naive", self.target, self.cfg.constants).result(label="naive")
        icl = Survey(self.backend, self.instrument, "icl", self.target, self.cfg.constants).result(label="icl")
        aligned = self.survey.result(best, label="aligned")
        result = {
            "settings": {**asdict(self.cfg), "projection_seed": self.cfg.proj_seed, "model": self.backend.name,
                         "instrument": self.instrument.id, "target": self.target.to_json(),
                         "constants": self.survey.constants},
            "profiles": {"naive": naive.to_json(), "icl": icl.to_json(), "aligned": aligned.to_json()},
            "history": history,
            "evaluations": history[-1]["evaluations"],
            "best_loss": history[-1]["best_loss"],
            "search_seconds": round(search_seconds, 1),
        }
        atomic_write_json(self.out / "result.json", result)
        self.profiles = [naive, icl, aligned]
        write_report(self.out, result, self.profiles)
        (self.out / CHECKPOINT).unlink(missing_ok=True)
        return result
