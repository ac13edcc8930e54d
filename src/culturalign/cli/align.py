"""`culturalign align`: search a soft prompt towards a culture, checkpointed and resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

import culturalign.cli.common as common
import culturalign.cli.options as o
from culturalign.cli.common import Command, console, out
from culturalign.errors import CulturalignError

app = typer.Typer()
_D = o.ALIGN_DEFAULTS


ALIGN_EPILOG = ("Resume: `culturalign align --out DIR --resume` continues DIR with its saved settings; add a larger --budget "
                "to extend a finished run. Every optimizer resumes mid-run to the identical result: de, sgn, random and adam "
                "from their saved state; cmaes (pycma) and dfols (DFO-LS), whose engines cannot export their state, by "
                "replaying their logged evaluations into a fresh engine (no model calls).")


@app.command(cls=Command, epilog=ALIGN_EPILOG)
def align(
    ctx: typer.Context,
    country: o.Country = None,
    model: o.Model = o.DEFAULT_MODEL,
    targets: o.Targets = o.DEFAULT_TARGETS,
    target_file: o.TargetFile = None,
    optimizer: Annotated[str, o.optimizer()] = _D.optimizer,
    budget: Annotated[int, o.budget("Candidate evaluations, each one full 24-item survey, spent in whole batches: sgn alternates --probes and --sgn-steps (after one for its start; at least 1 + probes + steps), de, cmaes and random evaluate --popsize per batch (de needs at least 2 x popsize), dfols and adam one (dfols needs at least dim + 2).")] = _D.budget,
    tokens: Annotated[int, o.tokens("Soft prompt length n (virtual tokens), >= 1.")] = _D.tokens,
    dim: Annotated[int, o.dim("Search dimension d of the black-box methods and adam-subspace, 1 <= d <= tokens x hidden: prompt = p0 + A z with z in R^d; d = tokens x hidden means no projection.")] = _D.dim,
    seed: Annotated[int, o.seed("Seed of the search, the initialisation and (unless --projection-seed) the projection A.")] = _D.seed,
    projection_seed: Optional[int] = typer.Option(None, "--projection-seed", metavar="N", help="Seed of the random projection A (default: --seed)."),
    init: str = typer.Option(_D.init, "--init", metavar="HOW", help="Initial prompt: text (persona sentence embeddings), vocab (sampled token embeddings), random."),
    init_text: Optional[str] = typer.Option(None, "--init-text", metavar="TEXT", help="Text for --init text (default: 'You are a typical person from <country>.')."),
    popsize: Annotated[int, o.popsize("Population of de, cmaes and random: de needs at least 4 (best1bin, rand1bin, currenttobest1bin) or 6 (rand2bin); cmaes and random at least 2.")] = _D.popsize,
    mutation: str = typer.Option(",".join(str(x) for x in _D.mutation), "--mutation", metavar="F", help="DE F in (0, 2]: a number, or 'min,max' dithered per generation."),
    crossover: float = typer.Option(_D.crossover, "--crossover", metavar="CR", help="DE crossover probability CR in [0, 1]."),
    strategy: str = typer.Option(_D.strategy, "--strategy", metavar="NAME", help="DE strategy: best1bin, rand1bin, currenttobest1bin, rand2bin."),
    bound: float = typer.Option(_D.bound, "--bound", metavar="B", help="Search box of the black-box methods: z in [-B, B]^d, B > 0."),
    sigma: Annotated[float, o.sigma("Size of the search around the initial prompt (> 0): RMS of A z per coordinate for z spread over the box, in units of the embedding table's std.")] = _D.sigma,
    cma_sigma0: float = typer.Option(_D.cma_sigma0, "--cma-sigma0", metavar="S", help="cmaes: initial step size as a fraction of --bound (> 0)."),
    dfols_rhobeg: float = typer.Option(_D.dfols_rhobeg, "--dfols-rhobeg", metavar="R", help="dfols: initial trust-region radius as a fraction of --bound, in (0, 2]."),
    lr: Annotated[float, o.lr("adam / adam-subspace learning rate (> 0).")] = _D.lr,
    probes: int = typer.Option(_D.probes, "--probes", metavar="P", help="sgn: directions probed per iteration (>= 1); an iteration is P probes then --sgn-steps steps."),
    sgn_steps: int = typer.Option(_D.sgn_steps, "--sgn-steps", metavar="Q", help="sgn: Gauss-Newton step candidates per iteration (>= 1)."),
    window: int = typer.Option(_D.window, "--window", metavar="M", help="sgn: directions kept in its linear model (>= --probes)."),
    directions: str = typer.Option(_D.directions, "--directions", metavar="KIND", help="sgn: gain (Gaussian scaled by the first layer's input gain), gaussian (isotropic), vocab (towards real token embeddings) or mixed; each moves one soft token."),
    probe_size: float = typer.Option(_D.probe_size, "--probe-size", metavar="H", help="sgn: probe length in real-token norms (> 0)."),
    radius: float = typer.Option(_D.radius, "--radius", metavar="R", help="sgn: initial trust radius in real-token norms (> 0)."),
    max_norm: float = typer.Option(_D.max_norm, "--max-norm", metavar="K", help="sgn: each soft token's norm stays <= K x the median real-token norm (capability bound; 0 = none)."),
    capability: Optional[float] = typer.Option(None, "--capability", metavar="R", help="Capability bound: penalise soft prompts under which a short neutral anchor text's perplexity rises more than R times (R > 1; 0 = off; default 0, 1.5 for sgn)."),
    capability_weight: float = typer.Option(_D.capability_weight, "--capability-weight", metavar="W", help="Capability penalty per nat/token past log(R), >= 0."),
    contrast: Annotated[float, o.contrast("Contrastive weight in [0, 1]: subtract W x the mean L1 to the target set's other cultures, so the search rewards this culture rather than any move away from the naive profile (0 = off, the paper's loss).")] = _D.contrast,
    mass_floor: Optional[float] = typer.Option(None, "--mass-floor", metavar="M", help="Option mass in [0, 1] below which the penalty applies (default 0.5; 0.8 for sgn)."),
    mass_weight: Optional[float] = typer.Option(None, "--mass-weight", metavar="W", help="Penalty weight, >= 0 (0 = off; default 100; 1000 for sgn)."),
    constant: Annotated[list[str], o.constant()] = None,
    instrument: Annotated[str, o.instrument("Built-in instrument id or a JSON file.")] = "vsm2013",
    order: Annotated[str, o.order(" The search, the naive, icl and aligned profiles all use it; the soft prompt records it.")] = _D.order,
    out_dir: Annotated[Optional[Path], o.out("Output folder, new or empty (default runs/<country>-<optimizer>-s<seed>).")] = None,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its checkpoint, with its saved settings (a larger --budget extends a finished run)."),
    device: o.Device = None,
):
    """Search a soft prompt that moves the model's VSM 2013 profile to a country's Hofstede scores.

    Writes the soft prompt (PEFT prompt-tuning format), result.json, report.md, radar.png and
    convergence.png to --out, and checkpoint.json after every generation.
    Example: culturalign align --country CN --budget 160
    """
    from culturalign.alignment.config import AlignConfig
    from culturalign.alignment.run import CHECKPOINT, Aligner, inspect_out
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
        cfg = _resumed_config(ctx, saved["config"], budget if common.given(ctx, "budget") else state["budget"], locals(), parts)
        target = Target.from_json(saved["target"])
        if country is not None or target_file is not None:
            typed = common.target(ctx, country, targets, target_file)
            if typed.to_json() != saved["target"]:
                raise CulturalignError(
                    f"--country/--target-file name {typed.name!r}, but the run in {out_dir} aligns to "
                    f"{saved['target']['name']!r}; leave them out to continue it"
                )
        if common.given(ctx, "model") and model != saved["model"]:
            raise CulturalignError(f"--model {model!r} differs from the run's model {saved['model']!r}; leave it out to continue")
        model = saved["model"]
    else:
        inst = load_instrument(instrument)
        target = common.target(ctx, country, targets, target_file)
        cfg = AlignConfig(
            optimizer=optimizer, budget=budget, tokens=tokens, dim=dim, seed=seed, projection_seed=projection_seed,
            init=init, init_text=init_text, popsize=popsize, mutation=parts[0] if len(parts) == 1 else tuple(parts),
            crossover=crossover, strategy=strategy, bound=bound, sigma=sigma,
            cma_sigma0=cma_sigma0, dfols_rhobeg=dfols_rhobeg, lr=lr, probes=probes, sgn_steps=sgn_steps, window=window,
            directions=directions, probe_size=probe_size, radius=radius, max_norm=max_norm, capability=capability,
            capability_weight=capability_weight, contrast=contrast, mass_floor=mass_floor,
            mass_weight=mass_weight, constants=inst.constants(common.parse_constants(constant)), order=order,
        )
        check_order(cfg.order, inst)
        if out_dir is None:
            slug = "".join(ch if ch.isalnum() else "-" for ch in (target.iso2 or target.code or target.name)).strip("-")
            out_dir = Path("runs") / f"{slug}-{cfg.optimizer}-s{cfg.seed}"
            inspect_out(out_dir, resume)
    lm = common.load_model(model, device)
    with console.status("preparing ..."):
        aligner = Aligner(lm, inst, target, cfg, out_dir, resume)
    if aligner.nothing_to_do:
        console.print(f"{escape(str(out_dir))} is finished ({aligner.evaluations_done} evaluations); nothing to do. "
                      "Pass a larger --budget to extend it.", highlight=False, soft_wrap=True)
        return
    progress = common.progress_bar("evals", "gen {task.fields[gen]}  best L1 {task.fields[best]}", remaining=True)
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
    from culturalign.alignment.config import AlignConfig

    values = dict(saved)
    if isinstance(values.get("mutation"), list):
        values["mutation"] = tuple(values["mutation"])
    typed = {**typed, "mutation": mutation[0] if len(mutation) == 1 else tuple(mutation)}
    for name in RESUMABLE:
        saved_value = values.get(name, getattr(_D, name))  # a setting newer than the checkpoint: its default
        if common.given(ctx, name) and typed[name] != saved_value:
            flag = "--" + name.replace("_", "-")
            raise CulturalignError(
                f"{flag} {typed[name]!r} differs from the run's {saved_value!r}; leave it out to continue with "
                "the saved settings"
            )
    if common.given(ctx, "constant"):
        constants = common.parse_constants(typed["constant"])
        if any(values["constants"].get(k.upper()) != v for k, v in constants.items()):
            raise CulturalignError(f"--constant differs from the run's constants {values['constants']}; leave it out")
    try:
        return AlignConfig(**values, budget=budget)
    except TypeError as e:
        raise CulturalignError(f"the checkpoint's settings are not understood ({e}); it was written by another version") from None
