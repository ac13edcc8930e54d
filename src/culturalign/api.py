"""The front door: measure, align and ask in one call each, from Python.

    import culturalign as ca
    p = ca.survey("CN"); print(p.l1)                      # a Profile
    run = ca.align("CN", budget=40); run.save("runs/cn")  # an Alignment
    print(ca.ask("How should I greet my manager?", culture="JP").text)  # an Answer

Each call runs the same code as its command (`culturalign survey`, `align`, `ask`): `Survey` and
`uniform_result`, the `Aligner`, `load_committee`. `model=` takes a name (the embedded "smollm2-135m" by
default), a local model folder, or a backend already loaded (`load_model`); a name is loaded once per
(name, device) and kept for the next call. Bad input raises `CulturalignError` with one line.

Light to import: nothing here imports torch or transformers until a call needs them, so
`import culturalign` stays fast (the package exposes these names lazily, see its `__getattr__`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from culturalign.errors import CulturalignError

DEFAULT_MODEL = "smollm2-135m"  # culturalign.backends.loading.EMBEDDED (not imported here: it imports torch)
DEFAULT_TARGETS = "hofstede-2015"
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "culturalign.json", "result.json", "report.md",
             "radar.png", "convergence.png", "checkpoint.json")  # what `culturalign align --out` writes

_MODELS: dict[tuple[str, str | None], Any] = {}  # (model name or folder, device) -> backend
_COMMITTEES: dict[tuple, Any] = {}  # (backend id, registry, top_k, encoder id) -> Committee


# ---- the model ----------------------------------------------------------------------------------------

def _model_key(name: str) -> str:
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def load_model(name: str | os.PathLike = DEFAULT_MODEL, device: str | None = None):
    """The backend for `name` (smollm2-135m, gemma3-270m, a local model folder or a hub id) on `device`
    (cpu or cuda[:N]; default cuda when available), loaded on the first call and reused after."""
    name = str(name)
    key = (_model_key(name), device)
    if key not in _MODELS:
        from culturalign.backends import load_backend

        _MODELS[key] = load_backend(name, device=device)
    return _MODELS[key]


def _backend(model, device: str | None):
    if isinstance(model, (str, os.PathLike)):
        return load_model(model, device)
    if not hasattr(model, "option_distributions") or not hasattr(model, "tokenizer"):
        raise CulturalignError(f"model={type(model).__name__}: expected a model name, a model folder or a backend "
                               "from culturalign.load_model")
    return model


# ---- survey -------------------------------------------------------------------------------------------

def _text(shown: list) -> str:
    """`shown` as the command line prints it (measure.report.print_profiles), as plain text."""
    import io

    from rich.console import Console

    from culturalign.measure.report import print_profiles

    buf = io.StringIO()
    print_profiles(shown, Console(file=buf, width=100, color_system=None))
    return buf.getvalue().rstrip()


class PNG(bytes):
    """A PNG image (bytes) that notebooks display."""

    def _repr_png_(self) -> bytes:
        return bytes(self)

    def __repr__(self) -> str:
        return f"<PNG image, {len(self)} bytes>"


@dataclass(repr=False, eq=False)  # eq would recurse: a naive profile is its own `naive`
class Profile:
    """A measured cultural profile: six indices, the L1 to the target, and the references it is read against.

    `result` is the survey's record (`SurveyResult`); `uniform` the floor (every item answered 1/K, no model
    call); `naive` the model's naive profile (this one, for a naive survey). `to_json()` is what
    `culturalign survey --json` writes for this profile."""

    result: Any  # culturalign.measure.survey.SurveyResult
    uniform: "Profile | None" = None
    naive: "Profile | None" = None

    indices = property(lambda self: self.result.indices, doc="Index -> score (PDI, IDV, MAS, UAI, LTO, IVR).")
    l1 = property(lambda self: self.result.l1, doc="L1 distance to the target over its published indices (None without one).")
    target = property(lambda self: self.result.target, doc="The target (`Target`), or None.")
    prompt = property(lambda self: self.result.prompt, doc="The prompt profile (naive, persona, icl, soft, aligned, uniform).")
    model = property(lambda self: self.result.model)
    order = property(lambda self: self.result.order)
    items = property(lambda self: self.result.items, doc="Per item: answer probabilities, mean, option mass.")
    option_mass = property(lambda self: self.result.mean_option_mass,
                           doc="Mean probability the model puts on the answer codes (1 = always answers with one).")

    def to_json(self) -> dict:
        from culturalign.measure.survey import survey_json

        return survey_json(self.result, None if self.uniform is None else self.uniform.result)

    def _shown(self) -> list:
        naive = [self.naive.result] if self.naive is not None and self.naive is not self else []
        return naive + [self.result] + ([self.uniform.result] if self.uniform is not None else [])

    def plot(self, path: str | os.PathLike | None = None):
        """The radar plot (target, naive, this profile, uniform): written to `path` (returned), or returned as a PNG
        a notebook displays."""
        from culturalign.measure.report import radar_plot

        if path is not None:
            radar_plot(Path(path), self._shown())
            return Path(path)
        with tempfile.TemporaryDirectory(prefix="culturalign-") as tmp:
            radar_plot(Path(tmp) / "radar.png", self._shown())
            return PNG((Path(tmp) / "radar.png").read_bytes())

    def __repr__(self) -> str:
        return _text(self._shown())


def _target(country, targets: str, target_file):
    from culturalign.measure.targets import Target, load_target

    if isinstance(country, Target):
        return country
    if target_file is not None and targets != DEFAULT_TARGETS:
        raise CulturalignError(f"targets={targets!r} and target_file both name targets; give only one of them")
    if country is None and target_file is None:
        return None
    return load_target(country, targets, target_file)


def _soft_prompt(soft_prompt):
    from culturalign.softprompt.prompt import SoftPrompt

    if soft_prompt is None or isinstance(soft_prompt, SoftPrompt):
        return soft_prompt
    if isinstance(soft_prompt, (str, os.PathLike)):
        return SoftPrompt.load(soft_prompt)
    raise CulturalignError(f"soft_prompt={type(soft_prompt).__name__}: expected a soft prompt folder or a SoftPrompt")


def survey(country=None, *, model=DEFAULT_MODEL, prompt: str | None = None, order: str | None = None,
           targets: str = DEFAULT_TARGETS, target_file=None, soft_prompt=None, instrument: str = "vsm2013",
           constants: dict[str, float] | None = None, mode: str = "logprob", samples: int = 20,
           temperature: float = 1.0, seed: int = 0, device: str | None = None) -> Profile:
    """Measure the model's six Hofstede indices with the VSM 2013 and compare them with `country`.

    `country`: a code or name (CN, CHN, China) in `targets`, a row of `target_file`, a `Target`, or None (no L1).
    `prompt`: naive (default), persona or icl. `soft_prompt`: a saved folder or a `SoftPrompt` (e.g.
    `align(...).soft_prompt`); it is measured before the prompt it was aligned with, and `prompt` must be left out.
    `order`: forward (default; with a soft prompt, the order it was aligned with), reversed or both.
    `mode`: logprob (answer distributions) or sample (`samples` answers per item at `temperature`, `seed`).
    A profile other than naive is measured with the naive one beside it (`Profile.naive`)."""
    from culturalign.measure.instrument import load_instrument
    from culturalign.measure.prompts import PROFILES
    from culturalign.measure.survey import MODES, check_order, saved_order

    if mode not in MODES:
        raise CulturalignError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if prompt is not None and prompt not in PROFILES:
        raise CulturalignError(f"prompt {prompt!r}: expected one of {', '.join(PROFILES)}")
    inst = load_instrument(instrument)
    if order is not None:
        check_order(order, inst)
    consts = inst.constants(constants)
    target = _target(country, targets, target_file)
    sp = _soft_prompt(soft_prompt)
    if sp is not None and prompt is not None:
        raise CulturalignError(f"prompt {prompt!r} and soft_prompt: a soft prompt is measured with the prompt it was "
                               f"aligned with ({sp.meta.get('prompt', 'naive')}); leave prompt out")
    prompt = prompt or "naive"
    if sp is not None:
        base = sp.meta.get("prompt", "naive")
        if base not in PROFILES:
            raise CulturalignError(f"soft prompt: culturalign.json names prompt {base!r}; expected one of {', '.join(PROFILES)}")
    if order is None:
        order = "forward" if sp is None else saved_order(sp, inst)
    lm = _backend(model, device)

    def measure(label: str, base: str, soft=None):
        from culturalign.measure.survey import Survey

        s = Survey(lm, inst, base, target, consts, order=order)
        return s.result(soft, label) if mode == "logprob" else s.sample(samples, temperature, soft, seed, label)

    if sp is None:
        result = measure(prompt, prompt)
    else:
        sp.check_width(lm.hidden_size)
        result = measure("soft", base, sp.embeddings)
        if sp.source is not None:
            result.extra["soft_prompt"] = sp.source
    from culturalign.measure.survey import uniform_result

    floor = Profile(uniform_result(inst, target, consts))
    profile = Profile(result, floor)
    profile.naive = profile if (sp is None and prompt == "naive") else Profile(measure("naive", "naive"), floor)
    return profile


# ---- align --------------------------------------------------------------------------------------------

@dataclass(repr=False, eq=False)
class Alignment:
    """An alignment run's result, like scipy's OptimizeResult: the soft prompt found, the profiles (naive, icl,
    aligned, uniform), the search history. `save(dir)` writes the folder `culturalign align --out` writes."""

    soft_prompt: Any  # culturalign.softprompt.prompt.SoftPrompt
    profiles: dict[str, Profile]
    history: list[dict]
    result: dict  # result.json
    path: Path | None = None  # the run folder, when align(out=...) was given one
    files: dict[str, bytes] = field(default_factory=dict)  # the run folder's files

    l1 = property(lambda self: self.profiles["aligned"].l1, doc="L1 of the aligned profile to the target.")
    fun = property(lambda self: self.result["best_loss"], doc="Best loss of the search (L1 + penalties).")
    nfev = property(lambda self: self.result["evaluations"], doc="Candidate evaluations (full surveys) spent.")
    message = property(lambda self: self.result["message"])
    settings = property(lambda self: self.result["settings"], doc="The run's settings (AlignConfig, model, target).")
    x = property(lambda self: self.soft_prompt.embeddings, doc="The soft prompt tensor [tokens, hidden].")

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the run folder (PEFT soft prompt, result.json, report.md, plots, checkpoint.json) to `folder`:
        new, empty, or holding an earlier run (whose files are replaced)."""
        from culturalign.files import atomic_write, check_output_dir

        folder = Path(folder).expanduser()
        check_output_dir(folder, "folder")
        if folder.is_dir() and any(folder.iterdir()) and not any((folder / n).exists() for n in ("result.json", "checkpoint.json")):
            raise CulturalignError(f"folder {str(folder)!r} is not empty and holds no culturalign run; choose a new or empty folder")
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            atomic_write(folder / name, lambda p, data=data: Path(p).write_bytes(data))
        return folder

    def __repr__(self) -> str:
        p = self.profiles
        head = (f"Alignment to {p['aligned'].target.name} with {self.settings['optimizer']}: "
                f"{self.nfev} evaluations, L1 {_fmt(p['naive'].l1)} naive -> {_fmt(self.l1)} aligned "
                f"(uniform {_fmt(p['uniform'].l1)}); soft prompt {list(self.x.shape)}")
        return head + "\n" + _text([p[k].result for k in ("naive", "icl", "aligned", "uniform")])


def _fmt(x) -> str:
    from culturalign.display import fmt

    return fmt(x)


def _align_config(settings: dict):
    """AlignConfig from keyword settings; an unknown name or a value of the wrong type is one error naming it."""
    from culturalign.alignment.config import AlignConfig

    names = [f.name for f in fields(AlignConfig)]
    for name, value in settings.items():
        if name not in names:
            raise CulturalignError(f"unknown setting {name!r}; AlignConfig's settings are {', '.join(names)}")
        want = {"int": int, "str": str}.get(str(AlignConfig.__dataclass_fields__[name].type).split(" |")[0])
        if want is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise CulturalignError(f"{name} must be an integer, got {value!r}")
        if want is str and not isinstance(value, str):
            raise CulturalignError(f"{name} must be a string, got {value!r}")
    try:
        return AlignConfig(**settings)
    except TypeError as e:  # a value of the wrong type compared or computed with
        raise CulturalignError(f"bad setting value ({e})") from None


def _load_run(folder: Path, keep_path: bool) -> Alignment:
    from culturalign.files import read_json_file
    from culturalign.measure.survey import SurveyResult
    from culturalign.softprompt.prompt import SoftPrompt

    result = read_json_file(folder / "result.json", "result")
    sp = SoftPrompt.load(folder)
    if not keep_path:
        sp.source = None  # the temporary folder is gone after this call
    profiles = {k: Profile(SurveyResult.from_json(v)) for k, v in result["profiles"].items()}
    for k, p in profiles.items():
        if k != "uniform":
            p.uniform, p.naive = profiles["uniform"], profiles["naive"]
    files = {n: (folder / n).read_bytes() for n in RUN_FILES if (folder / n).is_file()}
    return Alignment(sp, profiles, result["history"], result, folder if keep_path else None, files)


def align(country=None, budget: int | None = None, optimizer: str | None = None, *, model=DEFAULT_MODEL, out=None,
          targets: str = DEFAULT_TARGETS, target_file=None, instrument: str = "vsm2013",
          progress: Callable[[dict], None] | None = None, device: str | None = None, **settings) -> Alignment:
    """Search a soft prompt that moves the model's profile to `country`'s scores (as `culturalign align`).

    `budget`: candidate evaluations (full surveys); `optimizer`: sgn (default), de, cmaes, dfols, random, adam,
    adam-subspace. Other `settings` are `AlignConfig` fields (tokens, dim, seed, popsize, sigma, order, constants, ...).
    `out`: the run folder, checkpointed as it goes; calling again with the same settings continues an interrupted
    run, returns a finished one, or extends it with a larger budget. Without `out` the run happens in a temporary
    folder and its results stay in memory (`Alignment.save` writes them). `progress(info)` is called after every batch."""
    from culturalign.measure.instrument import load_instrument
    from culturalign.measure.survey import check_order

    if budget is not None:
        settings["budget"] = budget
    if optimizer is not None:
        settings["optimizer"] = optimizer
    inst = load_instrument(instrument)
    settings["constants"] = inst.constants(settings.get("constants"))
    cfg = _align_config(settings)
    check_order(cfg.order, inst)
    target = _target(country, targets, target_file)
    if target is None:
        raise CulturalignError("no target: give a country (e.g. \"CN\") or target_file")
    from culturalign.alignment.run import CHECKPOINT, Aligner, inspect_out

    if out is not None:
        out = Path(out)
        resume = (out / CHECKPOINT).is_file()
        inspect_out(out, resume)  # before the model loads
    lm = _backend(model, device)
    tmp = None if out is not None else tempfile.mkdtemp(prefix="culturalign-align-")
    try:
        folder = out if out is not None else Path(tmp) / "run"
        aligner = Aligner(lm, inst, target, cfg, folder, resume=out is not None and resume, progress=progress)
        if not aligner.nothing_to_do:
            aligner.run()
        return _load_run(folder, keep_path=out is not None)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# ---- ask ----------------------------------------------------------------------------------------------

def _committee(lm, registry, top_k: int, encoder):
    key = (id(lm), None if registry is None else str(Path(registry).expanduser().resolve()), top_k, id(encoder))
    if key not in _COMMITTEES:
        from culturalign.committee.compose import load_committee
        from culturalign.committee.router import RouterConfig

        _COMMITTEES[key] = load_committee(lm, None if registry is None else str(registry), RouterConfig(top_k=top_k),
                                          encoder=encoder)
    return _COMMITTEES[key]


def ask(question: str, culture: str | None = None, *, model=DEFAULT_MODEL, registry=None, options: list[str] | None = None,
        system: str = "committee", top_k: int = 3, max_new_tokens: int = 48, seed: int = 0, encoder=None,
        device: str | None = None):
    """Ask the committee of cultural experts (as `culturalign ask`): an `Answer` with `.text`, `.routing` (the
    experts, their weights and the reasons) and `.experts` (each expert's answer).

    `culture`: the user's culture (code or name), routed to its expert or its nearest ones. `registry`: an expert
    registry folder (default: the one shipped for the model). `options`: answer options, whose distributions the
    experts mix. `system`: committee, expert (top-1 only), persona or naive. `encoder`: the router's sentence
    encoder (anything with `encode(list[str]) -> Tensor`; default all-MiniLM-L6-v2)."""
    from culturalign.committee.compose import SYSTEMS, CommitteeConfig

    if system not in SYSTEMS:
        raise CulturalignError(f"system {system!r}: expected one of {', '.join(SYSTEMS)}")
    if not isinstance(question, str) or not question.strip():
        raise CulturalignError("the question is empty; ask something, e.g. \"How should I greet an elder?\"")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise CulturalignError(f"top_k must be an integer >= 1, got {top_k!r}")
    if registry is not None:
        from culturalign.committee.experts import load_registry

        load_registry(registry)  # a bad registry fails before the model loads
    cfg = CommitteeConfig(max_new_tokens=max_new_tokens, compose_max_new_tokens=max(max_new_tokens, 64), seed=seed)
    committee = _committee(_backend(model, device), registry, top_k, encoder)
    committee.config = cfg
    return committee.ask(question, culture=culture, options=options, system=system)
