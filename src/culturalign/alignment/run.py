"""Align a frozen model to a target culture: search a soft prompt, then measure and report it.

One run = one output folder:
    adapter_config.json, adapter_model.safetensors, culturalign.json   the soft prompt (PEFT format)
    result.json        settings, naive / icl / aligned / uniform profiles (survey schema), per-generation history
    report.md, radar.png, convergence.png
    checkpoint.json    optimiser state after every generation (atomic); `resume=True` continues it, and a
                       finished run (its checkpoint says so) can be extended with a larger budget

The objective (`objective.SurveyObjective`) is `Survey.loss`: the L1 distance of the indices (on the
target's known dimensions) plus an option-mass penalty. The black-box methods (de, cmaes, dfols,
random) search z in [-b, b]^d with prompt = p0 + A z (`Projection`); `adam` descends the full prompt
and `adam-subspace` descends z. Every method runs through `search.minimize`, the one loop. Each
candidate evaluation is one full survey; the budget counts them.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from culturalign.backends import Backend
from culturalign.errors import CulturalignError
from culturalign.files import atomic_write_json
from culturalign.measure.instrument import Instrument
from culturalign.alignment.config import AlignConfig
from culturalign.alignment.objective import CapabilityPenalty, ContrastTerm, SurveyObjective
from culturalign.measure.prompts import system_text
from culturalign.search.loop import LoopState, minimize
from culturalign.softprompt.params import FullPrompt, Projection, embedding_std, initial_prompt, vocab_rows
from culturalign.softprompt.prompt import SoftPrompt
from culturalign.measure.survey import Survey, uniform_result
from culturalign.measure.targets import Target

CHECKPOINT = "checkpoint.json"


def _fingerprint(cfg: AlignConfig, backend: Backend, target: Target, instrument: Instrument) -> dict:
    """What a resumed run must share with the checkpoint: every setting except the budget (which may grow)."""
    config = cfg.fingerprint_json()
    config.pop("budget")
    return {"config": config, "model": backend.name, "target": target.to_json(), "instrument": instrument.id}


def read_checkpoint(out: str | Path) -> dict:
    """A run folder's checkpoint, checked for the keys a resume needs; a damaged file is one clear error."""
    from culturalign.files import read_json_file

    path = Path(out) / CHECKPOINT
    try:
        state = read_json_file(path, "checkpoint")
    except CulturalignError as e:
        raise CulturalignError(f"{e}; the checkpoint is damaged: delete {str(path)!r} (or the folder) to start over") from None
    problem = None
    if not isinstance(state, dict):
        problem = f"expected a JSON object, got {type(state).__name__}"
    else:
        for key, kind in (("fingerprint", dict), ("optimizer_state", dict), ("history", list), ("budget", int)):
            if not isinstance(state.get(key), kind):
                problem = f"{key!r} is missing or not a JSON {'object' if kind is dict else kind.__name__}"
                break
        else:
            fp = state["fingerprint"]
            if not isinstance(fp.get("config"), dict) or not isinstance(fp.get("target"), dict):
                problem = "'fingerprint' lacks the run's settings"
            elif not state["history"] or not all(isinstance(h, dict) and "evaluations" in h for h in state["history"]):
                problem = "'history' has no finished generation"
    if problem:
        raise CulturalignError(
            f"checkpoint {str(path)!r} is damaged ({problem}); delete it (or the folder) to start over"
        )
    return state


def inspect_out(out: str | Path, resume: bool) -> dict | None:
    """What --out holds, checked before the model loads: None for a new or empty folder, the checkpoint to
    continue with `resume`, or one error (not writable, unrelated files, a run without --resume, ...)."""
    from culturalign.files import check_output_dir

    out = Path(out)
    check_output_dir(out, "--out")
    if (out / CHECKPOINT).exists():
        state = read_checkpoint(out)
        done, finished = state["history"][-1]["evaluations"], bool(state.get("finished"))
        if not resume:
            what = f"a finished run ({done} evaluations)" if finished else f"an interrupted run ({done} evaluations)"
            hint = "extend it with --resume and a larger --budget" if finished else "continue it with --resume"
            raise CulturalignError(f"{out} already holds {what}; {hint}, or choose another --out")
        return state
    if (out / "result.json").exists():
        raise CulturalignError(
            f"{out} holds a finished run (result.json) without its {CHECKPOINT}; it cannot be resumed or extended: "
            "choose another --out"
        )
    if resume:
        raise CulturalignError(f"nothing to resume in {out}: it has no {CHECKPOINT}")
    if out.is_dir() and any(out.iterdir()):
        raise CulturalignError(f"--out {str(out)!r} is not empty and holds no culturalign run; choose a new or empty folder")
    return None


class Aligner:
    """Runs one alignment; `run()` returns the result dict also written to `out/result.json`."""

    def __init__(self, backend: Backend, instrument: Instrument, target: Target, config: AlignConfig, out: str | Path,
                 resume: bool = False, progress: Callable[[dict], None] | None = None):
        self.backend, self.instrument, self.target, self.cfg = backend, instrument, target, config
        if config.uses_projection:
            Projection.check_dim(config.dim, config.tokens * backend.hidden_size)
        self.out, self.resume, self.progress = Path(out), resume, progress or (lambda info: None)
        self.survey = Survey(backend, instrument, config.prompt, target, config.constants, order=config.order)
        self.fingerprint = _fingerprint(config, backend, target, instrument)
        self.profiles: list = []  # naive, icl, aligned SurveyResults once `run()` has finished
        self.uniform = None  # and the uniform floor (`survey.uniform_result`)
        self.state = self._prepare_out()
        self.t_start = 0.0
        self.message = ""

    # -- set-up -------------------------------------------------------------------------------
    @property
    def evaluations_done(self) -> int:
        return self.state["history"][-1]["evaluations"] if self.state else 0

    @property
    def nothing_to_do(self) -> bool:
        """A finished run asked to resume with a budget its last generation already used up."""
        if not self.state or not self.state.get("finished"):
            return False
        return self.evaluations_done + self.cfg.batch_size > self.cfg.budget

    def _prepare_out(self) -> dict | None:
        """Check --out before any work: a new or empty folder, or (with resume) a checkpoint of the same run."""
        state = inspect_out(self.out, self.resume)
        if state is None:
            return None
        done = state["history"][-1]["evaluations"]
        if state["fingerprint"] != self.fingerprint:
            old, new = state["fingerprint"], self.fingerprint
            old_config = old.get("config", {})
            keys = list(new["config"]) + [k for k in old_config if k not in new["config"]]  # e.g. an order left out
            diff = [k for k in keys if old_config.get(k) != new["config"].get(k)]
            diff += [k for k in ("model", "target", "instrument") if old.get(k) != new[k]]
            raise CulturalignError(
                f"cannot resume {self.out}: its run used different settings ({', '.join(diff) or 'format'}); "
                "rerun with the same options, or choose another --out"
            )
        if self.cfg.budget < done:
            raise CulturalignError(f"--budget {self.cfg.budget} is below the {done} evaluations {self.out} has already done")
        return state

    def _p0(self) -> torch.Tensor:
        text = self.cfg.init_text or system_text("persona", self.target).split(". ")[0] + "."
        return initial_prompt(self.backend, self.cfg.tokens, self.cfg.init, text, self.cfg.seed)

    def _seconds(self) -> float:
        return round(time.perf_counter() - self.t_start, 2)

    def _checkpoint(self, optimizer_state: dict, history: list, finished: bool = False, seconds: float | None = None,
                    best: dict | None = None) -> None:
        from culturalign import __version__

        self.out.mkdir(parents=True, exist_ok=True)  # created with the first checkpoint, not before
        atomic_write_json(self.out / CHECKPOINT, {
            "culturalign_version": __version__, "fingerprint": self.fingerprint, "budget": self.cfg.budget,
            "instrument_source": self.instrument.source or self.instrument.id,
            "finished": finished, "search_seconds": self._seconds() if seconds is None else seconds, "optimizer_state": optimizer_state,
            "best": best, "history": history,
        })

    # -- the search ---------------------------------------------------------------------------------
    def _search(self, state: dict | None, p0: torch.Tensor) -> tuple[torch.Tensor, list, LoopState]:
        """Run the configured optimizer through the one loop; returns the best prompt, the history, the loop state."""
        cfg = self.cfg
        if cfg.uses_projection:
            param = Projection(p0, cfg.dim, cfg.proj_seed, embedding_std(self.backend), cfg.bound, cfg.sigma)
            x0 = None
        else:
            param = FullPrompt(p0)
            x0 = param.x0()
        capability = CapabilityPenalty(self.backend, cfg.capability, cfg.capability_weight) if cfg.capability else None
        contrast = None
        if cfg.contrast:
            from culturalign.measure.targets import load_target_set

            others = [t for t in load_target_set(self.target.set_name).targets if t.name != self.target.name]
            contrast = ContrastTerm(self.survey.loss_mask, others, self.instrument.dims, cfg.contrast)
        objective = SurveyObjective(self.survey, param, cfg.mass_floor, cfg.mass_weight, capability, contrast)
        directions = cfg.method.directions  # sgn: real-token rows and the input gain
        gain = self.backend.input_gain() if directions else None
        optimizer = cfg.make_optimizer(param.dim, x0, tuple(p0.shape), vocab_rows(self.backend) if directions else None,
                                       None if gain is None else gain.double().numpy())
        loop_state = None
        if state:
            try:
                loop_state = LoopState(state["optimizer_state"], state.get("best"), state["history"])
                optimizer.load_state_dict(loop_state.optimizer)
            except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
                raise CulturalignError(
                    f"checkpoint {str(self.out / CHECKPOINT)!r} is damaged (optimizer state: {e!r}); delete it to start over"
                ) from None
            if loop_state.best is None:
                raise CulturalignError(
                    f"checkpoint {str(self.out / CHECKPOINT)!r} has no best point (written by an older culturalign); "
                    "delete it to start over"
                )

        def checkpoint(ls: LoopState) -> None:
            self._check_finite(ls.history[-1])
            self._checkpoint(ls.optimizer, ls.history, best=ls.best)

        def progress(entry: dict) -> None:
            self.progress({**entry, "budget": cfg.budget})

        res = minimize(objective, optimizer, cfg.budget, state=loop_state, checkpoint=checkpoint, progress=progress,
                       clock=self._seconds, restore=False)
        if res.x is None:
            raise CulturalignError(f"--budget {cfg.budget} is smaller than the first batch of {cfg.optimizer}")
        self.message = res.message
        return param(res.x)[0].detach(), res.history, res.state

    def _check_finite(self, entry: dict) -> None:
        if not math.isfinite(entry["best_loss"]):
            raise CulturalignError(
                f"no candidate gave a finite loss after {entry['evaluations']} evaluations: the model's answers became "
                f"NaN; lower --sigma (now {self.cfg.sigma:g}) or --bound (now {self.cfg.bound:g})"
            )

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        from culturalign import __version__
        from culturalign.alignment.report import write_report

        state = self.state
        self.t_start = time.perf_counter() - (float(state.get("search_seconds", 0.0)) if state else 0.0)
        torch.manual_seed(self.cfg.seed)
        p0 = self._p0()
        best, history, final = self._search(state, p0)
        search_seconds = time.perf_counter() - self.t_start
        meta = {"prompt": self.cfg.prompt, "instrument": self.instrument.id, "model": self.backend.name,
                "target": self.target.to_json(), "optimizer": self.cfg.optimizer, "best_loss": history[-1]["best_loss"],
                "order": self.cfg.order}
        SoftPrompt(best, meta).save(self.out, self.backend.name, self.backend)
        naive = Survey(self.backend, self.instrument, "naive", self.target, self.cfg.constants,
                       order=self.cfg.order).result(label="naive")
        icl = Survey(self.backend, self.instrument, "icl", self.target, self.cfg.constants,
                     order=self.cfg.order).result(label="icl")
        aligned = self.survey.result(best, label="aligned")
        uniform = uniform_result(self.instrument, self.target, self.survey.constants)  # the floor, no model call
        result = {
            "culturalign_version": __version__,
            "settings": {**asdict(self.cfg), "projection_seed": self.cfg.proj_seed, "model": self.backend.name,
                         "instrument": self.instrument.id, "target": self.target.to_json(),
                         "constants": self.survey.constants},
            "profiles": {"naive": naive.to_json(), "icl": icl.to_json(), "aligned": aligned.to_json(),
                         "uniform": uniform.to_json()},
            "history": history,
            "evaluations": history[-1]["evaluations"],
            "best_loss": history[-1]["best_loss"],
            "best_l1": history[-1]["best_l1"],
            "message": self.message,
            "search_seconds": round(search_seconds, 1),
        }
        atomic_write_json(self.out / "result.json", result)
        self.profiles = [naive, icl, aligned]
        self.uniform = uniform
        write_report(self.out, result, self.profiles, uniform)
        self._checkpoint(final.optimizer, history, finished=True, seconds=round(search_seconds, 2), best=final.best)
        return result
