"""`culturalign mcq` and `culturalign heldout`: checks of a soft prompt on what its search never saw."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import culturalign.cli.common as common
import culturalign.cli.options as o
from culturalign.cli.common import Command
from culturalign.errors import CulturalignError

app = typer.Typer()


def _soft_prompt_target(sp, ctx, country, targets, target_file):
    """--country/--target-file when given, else the target saved in the soft prompt's culturalign.json."""
    from culturalign.measure.targets import Target

    if country is not None or target_file is not None:
        return common.target(ctx, country, targets, target_file)
    if common.given(ctx, "targets"):
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
    soft_prompt: Annotated[Optional[Path], o.soft_prompt(
        "A saved soft prompt folder: accuracy is measured without and with it.")] = None,
    model: o.Model = o.DEFAULT_MODEL,
    json_path: Annotated[Optional[Path], o.json_file(
        "Write the results, with each question's prediction, as JSON (- = standard output).")] = None,
    device: o.Device = None,
):
    """Multiple-choice cultural knowledge check: accuracy overall and per country, without and with a soft prompt.

    Example: culturalign mcq --soft-prompt src/culturalign/data/experts/smollm2-135m/CN
    """
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
    lm = common.load_model(model, device)
    if sp is not None:
        sp.check_width(lm.hidden_size)
    bar = common.progress_bar("questions", transient=True)
    with bar:
        task = bar.add_task("mcq", total=len(qs))
        res = run_mcq(lm, qs, None if sp is None else sp.embeddings, target,
                      progress=lambda n: bar.update(task, completed=n))
    res = {"model": lm.name, "soft_prompt": None if sp is None else sp.source, **res}
    shown = common.emit_json(json_path, res)
    shown.print(mcq_table(res))
    for line in mcq_notes(res):
        shown.print(line, highlight=False, soft_wrap=True, markup=False)


@app.command(cls=Command)
def heldout(
    ctx: typer.Context,
    soft_prompt: Annotated[Path, o.soft_prompt("The aligned soft prompt folder to check.")] = ...,
    country: Annotated[Optional[str], o.country(o.COUNTRY_HELP + " Default: the target saved with the soft prompt.")] = None,
    targets: o.Targets = o.DEFAULT_TARGETS,
    target_file: o.TargetFile = None,
    mcq_file: Optional[Path] = typer.Option(None, "--mcq-file", metavar="FILE", help="Questions for the MCQ check (see `culturalign mcq --help`). Default: the shipped set."),
    text: Optional[Path] = typer.Option(None, "--text", metavar="FILE", help="Text for the perplexity check (UTF-8). Default: the shipped neutral text."),
    constant: Annotated[list[str], o.constant(o.CONSTANT_HELP + " Default 0 for all.")] = None,
    order: Annotated[Optional[str], o.order(
        " Default: the order the soft prompt was aligned with (its culturalign.json), else forward.")] = None,
    model: o.Model = o.DEFAULT_MODEL,
    json_path: Annotated[Optional[Path], o.json_file(
        "Write every check's numbers as JSON (- = standard output).")] = None,
    device: o.Device = None,
):
    """Held-out checks of a soft prompt, each without and with it: L1 on paraphrased items and on reversed
    options (and the share of the L1 gain kept), MCQ cultural knowledge, and perplexity of a neutral text.

    Example: culturalign heldout --soft-prompt src/culturalign/data/experts/smollm2-135m/CN
    """
    import time

    from culturalign.files import check_output_file
    from culturalign.heldout import run_heldout
    from culturalign.heldout.mcq import load_mcq
    from culturalign.heldout.perplexity import load_text
    from culturalign.heldout.tables import heldout_table
    from culturalign.measure.instrument import load_instrument
    from culturalign.measure.prompts import PROFILES
    from culturalign.softprompt.prompt import SoftPrompt
    from culturalign.measure.survey import check_order, saved_order

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
        order = saved_order(sp, inst)
    constants = inst.constants(common.parse_constants(constant))
    load_mcq(mcq_file)  # bad inputs fail before the model loads
    load_text(text)
    if json_path is not None:
        check_output_file(json_path, "--json")
    lm = common.load_model(model, device)
    sp.check_width(lm.hidden_size)
    bar = common.progress_bar(transient=True)
    update = common.stage_updater(bar)
    t0 = time.perf_counter()
    with bar:
        result = run_heldout(lm, sp, target, prompt=profile, constants=constants, mcq_file=mcq_file, progress=update,
                             instrument=instrument, text_file=text, order=order)
    shown = common.emit_json(json_path, result)
    shown.print(heldout_table(result))
    shown.print("change = with - without (ratio with / without for perplexity); gain kept = (L1 without - L1 with) on "
                "the variant / the same on the original; uniform = the L1 of an answerer that spreads every item evenly "
                "over its options (no model), the floor.", highlight=False, soft_wrap=True)
    for v in result["survey"]["variants"]:
        if v["kept"] is None and v["kept_note"]:
            shown.print(f"gain kept on {v['instrument']}: {v['kept_note']}", highlight=False, soft_wrap=True, markup=False)
    shown.print(f"held-out checks took {time.perf_counter() - t0:.1f} s", highlight=False)
