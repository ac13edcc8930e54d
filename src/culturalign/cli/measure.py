"""`culturalign countries` and `culturalign survey`: the targets, and the model's measured profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import culturalign.cli.common as common
import culturalign.cli.options as o
from culturalign.cli.common import Command, out
from culturalign.errors import CulturalignError

app = typer.Typer()


@app.command(cls=Command)
def countries(
    targets: Annotated[str, o.targets("Target set: hofstede-2015 or hofstede-2023.")] = o.DEFAULT_TARGETS,
    as_json: Annotated[bool, o.json_flag("Print JSON instead of a table.")] = False,
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
    country: o.Country = None,
    prompt: list[str] = typer.Option(
        None, "--prompt", "-p", metavar="PROFILE",
        help="Prompt profile, repeatable: naive (item alone), persona (answer as a typical person from the country), "
        "icl (persona + the country's published scores). Default: naive, or only the soft prompt if --soft-prompt is given.",
    ),
    model: o.Model = o.DEFAULT_MODEL,
    targets: o.Targets = o.DEFAULT_TARGETS,
    target_file: Annotated[Optional[Path], o.target_file(
        "Your own targets: CSV/JSON with name + any of PDI IDV MAS UAI LTO IVR.")] = None,
    instrument: Annotated[str, o.instrument("Built-in instrument id or a JSON file of the same schema.")] = "vsm2013",
    constant: Annotated[list[str], o.constant(o.CONSTANT_HELP + " Default 0 for all.")] = None,
    mode: str = typer.Option("logprob", "--mode", metavar="MODE", help="logprob: next-token distribution over the answer codes; sample: generate and parse answers."),
    samples: Optional[int] = typer.Option(None, "--samples", metavar="N", help="Answers generated per item (sample mode only). \\[default: 20]"),
    temperature: Optional[float] = typer.Option(None, "--temperature", metavar="T", help="Sampling temperature, >= 0; 0 = greedy (sample mode only). \\[default: 1.0]"),
    soft_prompt: Annotated[Optional[Path], o.soft_prompt(
        "A saved soft prompt folder (PEFT prompt-tuning format), profile 'soft'.")] = None,
    seed: Annotated[Optional[int], o.seed("Random seed (sample mode only). \\[default: 0]")] = None,
    order: Annotated[Optional[str], o.order(
        " Default: forward; with --soft-prompt, the order it was aligned with (for every profile).")] = None,
    json_path: Annotated[Optional[Path], o.json_file(
        "Write the profile(s) here (- = standard output): one object for one profile, a list for several.")] = None,
    device: o.DeviceDefaultCuda = None,
):
    """Measure the model's six Hofstede dimensions with the VSM 2013 and compare them with a country.

    Example: culturalign survey --country CN --prompt naive --prompt persona --prompt icl
    """
    from culturalign.files import check_output_file
    from culturalign.measure.instrument import load_instrument
    from culturalign.measure.prompts import PROFILES
    from culturalign.measure.report import print_profiles
    from culturalign.softprompt.prompt import SoftPrompt
    from culturalign.measure.survey import MODES, Survey, check_order, saved_order, survey_json, uniform_result

    if mode not in MODES:
        raise CulturalignError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode != "sample":
        given = [f"--{n}" for n in ("samples", "temperature", "seed") if common.given(ctx, n)]
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
    constants = inst.constants(common.parse_constants(constant))
    target = common.target(ctx, country, targets, target_file) if (country is not None or target_file) else None
    sp = SoftPrompt.load(soft_prompt) if soft_prompt is not None else None  # fails before the model loads
    if order is None:  # every profile in the order the soft prompt was aligned with, so that they compare
        order = "forward" if sp is None else saved_order(sp, inst)
    lm = common.load_model(model, device)
    runs = [(p, p, None, None) for p in prompts]
    if sp is not None:
        sp.check_width(lm.hidden_size)
        runs.append(("soft", sp.meta.get("prompt", "naive"), sp.embeddings, sp.source))

    results = []
    bar = common.progress_bar("items", transient=True)
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
        data = [survey_json(r, floor) for r in results]
    shown = common.emit_json(json_path, None if data is None else data[0] if len(data) == 1 else data)
    print_profiles(results + [floor], shown)
    shown.print("uniform: every item answered 1/K over its options, no model call (the floor a profile must beat)",
                highlight=False, soft_wrap=True)
    if mode == "sample":
        bad = sum(r.extra["unparsable"] for r in results)
        asked = len(results) * samples * len(inst.items) * (2 if order == "both" else 1)
        shown.print(f"unparsable answers: {bad} of {asked}")
