"""The `culturalign` command line (Typer). Every user error is one red line, never a traceback."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from culturalign.errors import CulturalignError

app = typer.Typer(
    help="Measure and align a frozen language model's cultural profile (Hofstede's VSM 2013).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

MODEL_HELP = "smollm2-135m (embedded default), a local Hugging Face model directory, or a hub id."
COUNTRY_HELP = "Target country or region: ISO code (CN, CHN), Hofstede code (CHI) or name (China)."


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.basicConfig(format="%(message)s", level=logging.WARNING)


def _parse_constants(values: list[str] | None) -> dict[str, float]:
    constants = {}
    for v in values or []:
        key, sep, num = v.partition("=")
        try:
            if not sep:
                raise ValueError
            constants[key.strip().upper()] = float(num)
        except ValueError:
            raise CulturalignError(f"--constant {v!r}: expected INDEX=NUMBER, e.g. --constant PDI=50") from None
    return constants


def _load(model: str, device: Optional[str]):
    from culturalign.backends import load_backend

    with console.status(f"loading model {model} ..."):
        return load_backend(model, device=device)


@app.command()
def countries(
    targets: str = typer.Option("hofstede-2015", "--targets", help="Target set: hofstede-2015 or hofstede-2023."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """List the countries and regions of a target set with their six scores."""
    from rich.table import Table

    from culturalign.targets import DIMS, load_target_set

    ts = load_target_set(targets)
    if as_json:
        out.print_json(json.dumps([
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


@app.command()
def survey(
    country: Optional[str] = typer.Option(None, "--country", "-c", help=COUNTRY_HELP),
    prompt: list[str] = typer.Option(
        None, "--prompt", "-p",
        help="Prompt profile, repeatable: naive (item alone), persona (answer as a typical person from the country), "
        "icl (persona + the country's published scores). Default: naive, or only the soft prompt if --soft-prompt is given.",
    ),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    targets: str = typer.Option("hofstede-2015", "--targets", help="Target set: hofstede-2015 or hofstede-2023."),
    target_file: Optional[Path] = typer.Option(None, "--target-file", help="Your own targets: CSV/JSON with name + any of PDI IDV MAS UAI LTO IVR."),
    instrument: str = typer.Option("vsm2013", "--instrument", help="Built-in instrument id or a JSON file of the same schema."),
    constant: list[str] = typer.Option(None, "--constant", help="Index constant C, repeatable: --constant PDI=50. Default 0 for all."),
    mode: str = typer.Option("logprob", "--mode", help="logprob: next-token distribution over the answer codes; sample: generate and parse answers."),
    samples: int = typer.Option(20, "--samples", help="Answers generated per item in sample mode."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature in sample mode."),
    soft_prompt: Optional[Path] = typer.Option(None, "--soft-prompt", help="A saved soft prompt folder (PEFT prompt-tuning format), profile 'soft'."),
    seed: int = typer.Option(0, "--seed", help="Random seed (sample mode)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the profile(s) here: one object for one profile, a list for several."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda[:N]; default cuda when available."),
):
    """Measure the model's six Hofstede dimensions with the VSM 2013 and compare them with a country.

    Example: culturalign survey --country CN --prompt naive --prompt persona --prompt icl
    """
    from culturalign.instrument import load_instrument
    from culturalign.prompts import PROFILES
    from culturalign.reports import print_profiles
    from culturalign.softprompt import SoftPrompt
    from culturalign.survey import MODES, Survey
    from culturalign.targets import load_target

    if mode not in MODES:
        raise CulturalignError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    prompts = list(prompt or ([] if soft_prompt else ["naive"]))
    for p in prompts:
        if p not in PROFILES:
            raise CulturalignError(f"--prompt {p!r}: expected one of {', '.join(PROFILES)}")
    inst = load_instrument(instrument)
    constants = inst.constants(_parse_constants(constant))
    target = load_target(country, targets, target_file) if (country or target_file) else None
    backend = _load(model, device)
    runs = [(p, p, None) for p in prompts]
    if soft_prompt:
        sp = SoftPrompt.load(soft_prompt, backend.hidden_size)
        runs.append(("soft", sp.meta.get("prompt", "naive"), sp.embeddings))
    results = []
    for label, base, soft in runs:
        with console.status(f"asking {len(inst.items)} items ({label}, {mode}) ..."):
            s = Survey(backend, inst, base, target, constants)
            if mode == "logprob":
                results.append(s.result(soft, label))
            else:
                results.append(s.sample(samples, temperature, soft, seed, label))
    if json_path:
        data = [r.to_json() for r in results]
        from culturalign.files import atomic_write_json

        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(json_path, data[0] if len(data) == 1 else data, indent=2)
        console.print(f"wrote {json_path}")
    print_profiles(results, out)
    if mode == "sample":
        bad = sum(r.extra["unparsable"] for r in results)
        out.print(f"unparsable answers: {bad} of {len(results) * samples * len(inst.items)}")


@app.command()
def align(
    country: Optional[str] = typer.Option(None, "--country", "-c", help=COUNTRY_HELP),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help=MODEL_HELP),
    targets: str = typer.Option("hofstede-2015", "--targets", help="Target set: hofstede-2015 or hofstede-2023."),
    target_file: Optional[Path] = typer.Option(None, "--target-file", help="Your own targets (CSV/JSON)."),
    optimizer: str = typer.Option("de", "--optimizer", help="de: Differential Evolution (black-box, the paper's method); adam: gradient descent on the full prompt (white-box comparison)."),
    budget: int = typer.Option(160, "--budget", help="Candidate evaluations (each one full 24-item survey). DE: popsize per generation; adam: one per step."),
    tokens: int = typer.Option(32, "--tokens", help="Soft prompt length n (virtual tokens)."),
    dim: int = typer.Option(16, "--dim", help="DE search dimension d: prompt = p0 + A z with z in R^d; tokens x hidden = no projection."),
    seed: int = typer.Option(0, "--seed", help="Seed for DE, initialisation and (unless --projection-seed) the projection A."),
    projection_seed: Optional[int] = typer.Option(None, "--projection-seed", help="Seed of the random projection A (default: --seed)."),
    init: str = typer.Option("text", "--init", help="Initial prompt: text (persona sentence embeddings), vocab (sampled token embeddings), random."),
    init_text: Optional[str] = typer.Option(None, "--init-text", help="Text for --init text (default: 'You are a typical person from <country>.')."),
    popsize: int = typer.Option(6, "--popsize", help="DE population size."),
    mutation: str = typer.Option("0.5,1.0", "--mutation", help="DE F: a number, or 'min,max' dithered per generation."),
    crossover: float = typer.Option(0.9, "--crossover", help="DE crossover probability CR."),
    strategy: str = typer.Option("best1bin", "--strategy", help="DE strategy: best1bin, rand1bin, currenttobest1bin, rand2bin."),
    bound: float = typer.Option(1.0, "--bound", help="DE box: z in [-bound, bound]^d."),
    sigma: float = typer.Option(40.0, "--sigma", help="Size of the DE search around the initial prompt: std of A z per coordinate, in units of the embedding table's std."),
    lr: float = typer.Option(0.02, "--lr", help="Adam learning rate."),
    mass_floor: float = typer.Option(0.5, "--mass-floor", help="Option mass below which the penalty applies."),
    mass_weight: float = typer.Option(100.0, "--mass-weight", help="Penalty weight (0 = off)."),
    constant: list[str] = typer.Option(None, "--constant", help="Index constant C, repeatable: --constant PDI=50."),
    instrument: str = typer.Option("vsm2013", "--instrument", help="Built-in instrument id or a JSON file."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/<country>-<optimizer>-s<seed>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run in --out from its last checkpoint."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda[:N]."),
):
    """Search a soft prompt that moves the model's VSM 2013 profile to a country's Hofstede scores.

    Writes the soft prompt (PEFT prompt-tuning format), result.json, report.md, radar.png and
    convergence.png to --out. Example: culturalign align --country CN --budget 160
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from culturalign.alignment import AlignConfig, Aligner
    from culturalign.instrument import load_instrument
    from culturalign.reports import print_profiles
    from culturalign.targets import load_target

    try:
        parts = [float(x) for x in mutation.split(",")]
        if len(parts) not in (1, 2):
            raise ValueError
    except ValueError:
        raise CulturalignError(f"--mutation {mutation!r}: expected a number or 'min,max'") from None
    inst = load_instrument(instrument)
    target = load_target(country, targets, target_file)
    cfg = AlignConfig(
        optimizer=optimizer, budget=budget, tokens=tokens, dim=dim, seed=seed, projection_seed=projection_seed,
        init=init, init_text=init_text, popsize=popsize, mutation=parts[0] if len(parts) == 1 else tuple(parts),
        crossover=crossover, strategy=strategy, bound=bound, sigma=sigma, lr=lr, mass_floor=mass_floor, mass_weight=mass_weight,
        constants=inst.constants(_parse_constants(constant)),
    ).validate()
    slug = "".join(ch if ch.isalnum() else "-" for ch in (target.iso2 or target.code or target.name)).strip("-")
    out_dir = out_dir or Path("runs") / f"{slug}-{optimizer}-s{seed}"
    backend = _load(model, device)
    with console.status("preparing ..."):
        aligner = Aligner(backend, inst, target, cfg, out_dir, resume)
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("evals"),
        TextColumn("gen {task.fields[gen]}  best L1 {task.fields[best]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console,
    )
    with progress:
        total = budget // popsize * popsize if optimizer == "de" else budget  # DE spends whole generations
        task = progress.add_task(f"align {target.name} ({optimizer})", total=total, gen=0, best="-")

        def update(info):
            progress.update(task, completed=info["evaluations"], gen=info["generation"], best=f"{info['best_loss']:.1f}")

        aligner.progress = update
        aligner.run()
    print_profiles(aligner.profiles, out)
    console.print(f"soft prompt, result.json, report.md, radar.png, convergence.png -> {out_dir}")


def main() -> None:
    _quiet_libraries()
    try:
        app()
    except CulturalignError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]")
        sys.exit(130)


if __name__ == "__main__":
    main()
