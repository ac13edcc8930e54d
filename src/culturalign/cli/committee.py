"""The committee of cultural experts: `culturalign experts build|list`, `culturalign ask` and
`culturalign committee eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

import culturalign.cli.common as common
import culturalign.cli.options as o
from culturalign.cli.common import Command, Group, console, out
from culturalign.errors import CulturalignError

app = typer.Typer()  # ask
_D = o.ALIGN_DEFAULTS
TOP_K_HELP = "At most K experts answer."

experts_app = typer.Typer(help="Build and inspect registries of cultural experts (one aligned soft prompt per culture).",
                          no_args_is_help=True, cls=Group)
committee_app = typer.Typer(help="Evaluate the committee of cultural experts.", no_args_is_help=True, cls=Group)


@experts_app.command("build", cls=Command)
def experts_build(
    ctx: typer.Context,
    countries: str = typer.Option(..., "--countries", metavar="LIST", help="Cultures, comma-separated, each CODE or CODE@SET: CN,US,IN,SA@hofstede-2023."),
    out_dir: Annotated[Path, o.out(
        "Registry folder: new, empty, or a registry to continue (finished experts are kept).")] = ...,
    model: o.Model = o.DEFAULT_MODEL,
    targets: Annotated[str, o.targets("Target set for cultures given without @SET.")] = o.DEFAULT_TARGETS,
    optimizer: Annotated[str, o.optimizer("Any optimizer `align` offers (see `align --help`).")] = _D.optimizer,
    budget: Annotated[int, o.budget("Candidate evaluations per expert (see `align --help`).")] = _D.budget,
    tokens: Annotated[int, o.tokens("Soft prompt length.")] = _D.tokens,
    dim: Annotated[int, o.dim("Search dimension of the black-box methods.")] = _D.dim,
    sigma: Annotated[float, o.sigma("Search size (embedding stds).")] = _D.sigma,
    popsize: Annotated[int, o.popsize("Population of de, cmaes and random.")] = _D.popsize,
    lr: Annotated[float, o.lr("Adam learning rate.")] = _D.lr,
    seed: Annotated[int, o.seed("Seed of every expert's search.")] = _D.seed,
    order: Annotated[str, o.order(" Every expert's search uses it.")] = _D.order,
    contrast: Annotated[float, o.contrast(
        "Contrastive weight in [0, 1] (see `align --help`): each expert is rewarded for its own culture rather than "
        "for any move away from the naive profile (0 = off).")] = _D.contrast,
    device: o.Device = None,
):
    """Align one soft prompt per culture and write a registry (one PEFT folder per culture + manifest.json).

    Rerun the same command to continue: finished experts are kept, an interrupted one resumes.
    Example: culturalign experts build --countries CN,US,IN,SA@hofstede-2023 --optimizer adam --budget 16 --out experts/
    """
    from culturalign.alignment.config import AlignConfig
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
    lm = common.load_model(model, device)
    progress = common.progress_bar("evals", "best L1 {task.fields[best]}")
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
        console.print("[yellow]interrupted:[/yellow] finished experts and the current checkpoint are kept; rerun the "
                      "same command to continue", highlight=False, soft_wrap=True)
        raise SystemExit(130) from None
    out.print(experts_table(reg))
    console.print(f"registry with {len(reg)} experts -> {escape(str(out_dir))}", highlight=False)


@experts_app.command("list", cls=Command)
def experts_list(
    folder: Optional[Path] = typer.Argument(None, metavar="[DIR]", help=o.EXPERTS_HELP),
    model: Annotated[str, o.model("Model whose shipped registry to list when DIR is not given.")] = o.DEFAULT_MODEL,
    as_json: Annotated[bool, o.json_flag("Print the manifest entries as JSON.")] = False,
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


@app.command(cls=Command)
def ask(
    question: str = typer.Argument(..., metavar="QUESTION", help="The query, in quotes."),
    culture: Optional[str] = typer.Option(None, "--culture", metavar="CULTURE", help="The user's culture (code or name): routes to its expert, or its nearest experts."),
    options: Optional[str] = typer.Option(None, "--options", metavar="A|B|...", help="Answer options separated by '|': the experts' answer distributions are mixed."),
    experts: o.Experts = None,
    system: str = typer.Option("committee", "--system", metavar="NAME", help="committee, expert (top-1 only), persona (text persona of --culture) or naive."),
    top_k: Annotated[int, o.top_k(TOP_K_HELP)] = 3,
    max_new_tokens: o.MaxNewTokens = 48,
    seed: Annotated[int, o.seed("Generation seed.")] = 0,
    model: o.Model = o.DEFAULT_MODEL,
    json_path: Annotated[Optional[Path], o.json_file(
        "Write the answer, routing and expert answers as JSON (- = standard output).")] = None,
    device: o.Device = None,
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
    committee = common.load_committee(model, device, experts, top_k, max_new_tokens, seed)
    culture = committee.resolve_culture(culture)
    with console.status("asking ..."):
        answer = committee.ask(question, culture=culture, options=opts, system=system)
    print_answer(answer, common.emit_json(json_path, None if json_path is None else answer.to_json(), announce=False))


@committee_app.command("eval", cls=Command)
def committee_eval(
    out_dir: Annotated[Path, o.out(
        "Where metrics.json, results.csv, report.md and plots go (new or empty).")] = ...,
    experts: o.Experts = None,
    queries: Optional[Path] = typer.Option(None, "--queries", metavar="FILE", help="Query set (JSONL or CSV; default: the shipped set)."),
    heldout: Annotated[str, o.heldout(
        "Cultures held out of the registry, for held-out alignment.", metavar="LIST")] = "FR,MX,KR,SE",
    open_limit: int = typer.Option(8, "--open-limit", metavar="N", help="Open questions asked per system (generation is slow on a CPU)."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="Ask only the first N queries with options (default: all)."),
    top_k: Annotated[int, o.top_k(TOP_K_HELP)] = 3,
    max_new_tokens: o.MaxNewTokens = 32,
    order: Annotated[str, o.order(" Applies to the alignment metric's survey items.")] = "forward",
    model: o.Model = o.DEFAULT_MODEL,
    device: o.Device = None,
):
    """Measure naive, persona, single-expert and committee systems with one set of metric definitions, next to
    two references: the uniform floor and the wrong expert (each culture served by the other experts).

    Example: culturalign committee eval --out runs/committee
    """
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
    committee = common.load_committee(model, device, experts, top_k, max_new_tokens, 0)
    reg_codes = committee.registry.codes
    overlap = sorted(set(held) & set(reg_codes))
    if overlap:
        raise CulturalignError(f"--heldout {heldout!r}: {', '.join(overlap)} have experts in the registry; hold out others")
    targets = {c: _registry_target(committee.registry[c]) for c in reg_codes}
    targets.update({c: t for c, t in held_targets.items()})
    cfg = EvalConfig(registry_cultures=reg_codes, heldout_cultures=held, open_limit=open_limit, query_limit=limit,
                     order=order)
    progress = common.progress_bar()
    update = common.stage_updater(progress)
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
