"""What every command shares at run time: the consoles, the error line, the progress bar, loading the model
and the committee, --json output, and the checks of the inputs several commands take (targets, constants,
a soft prompt's saved order).

Light at import (typer and rich's console only): `culturalign --help` must not load torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from culturalign.display import quiet_libraries
from culturalign.errors import CulturalignError

console = Console(stderr=True)  # progress, notes and errors
out = Console()  # results


def _no_flag_types(params):
    """Flags (boolean options and --help) take no value, so their help rows show no type."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class Command(TyperCommand):
    def get_params(self, ctx):
        return _no_flag_types(super().get_params(ctx))

    def invoke(self, ctx):
        """Run the command; the libraries are quieted first (not for --help or a usage error, which never get
        here, so that those stay fast: quieting imports transformers)."""
        quiet_libraries()
        return super().invoke(ctx)


class Group(TyperGroup):
    def get_params(self, ctx):
        return _no_flag_types(super().get_params(ctx))


def error_line(message: str) -> None:
    text = " ".join(str(message).split())  # one line, whatever the message held
    console.print(f"[red]error:[/red] {escape(text)}", highlight=False, soft_wrap=True)


def progress_bar(*fields: str, remaining: bool = False, transient: bool = False):
    """The one progress bar: description, bar, done/total, then `fields` (rich text columns such as "evals" or
    "best L1 {task.fields[best]}"), elapsed time and, with `remaining`, the estimated time left."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *map(TextColumn, fields),
               TimeElapsedColumn()]
    if remaining:
        columns.append(TimeRemainingColumn())
    return Progress(*columns, console=console, transient=transient)


def stage_updater(bar):
    """A progress(stage, done, total) callback that gives each new stage its own row of `bar`."""
    stages: dict = {}

    def update(stage, done, total):
        if stage not in stages:
            stages[stage] = bar.add_task(stage, total=total)
        bar.update(stages[stage], completed=done, total=total)

    return update


def load_model(model: str, device: Optional[str]):
    from culturalign.backends import load_backend

    with console.status(f"loading model {escape(model)} ..."):
        return load_backend(model, device=device)


def load_committee(model, device, experts, top_k, max_new_tokens, seed):
    from culturalign.committee.compose import CommitteeConfig, load_committee as load
    from culturalign.committee.router import RouterConfig

    router_cfg = RouterConfig(top_k=top_k)
    cfg = CommitteeConfig(max_new_tokens=max_new_tokens, compose_max_new_tokens=max(max_new_tokens, 64), seed=seed)
    if experts is not None:
        from culturalign.committee.experts import load_registry

        load_registry(experts)  # a bad registry fails before the model loads
    lm = load_model(model, device)
    with console.status("loading experts and router ..."):
        return load(lm, None if experts is None else str(experts), router_cfg, cfg)


def emit_json(json_path: Optional[Path], data, announce: bool = True) -> Console:
    """Write `data` to --json (a file, or standard output for '-') and return the console for the tables:
    stderr when the JSON went to standard output, so that stays pure JSON."""
    from culturalign.files import STDOUT, write_json_output

    to_stdout = json_path is not None and str(json_path) == STDOUT
    if json_path is not None:
        write_json_output(json_path, data)
        if announce and not to_stdout:
            console.print(f"wrote {escape(str(json_path))}", highlight=False)
    return console if to_stdout else out


def parse_constants(values: list[str] | None) -> dict[str, float]:
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


def given(ctx: typer.Context, name: str) -> bool:
    """True when the user typed option `name` (not a default)."""
    from typer._click.core import ParameterSource  # Typer vendors click; its contexts use this enum

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def target(ctx: typer.Context, country, targets, target_file):
    from culturalign.measure.targets import load_target

    if target_file is not None and given(ctx, "targets"):
        raise CulturalignError(f"--targets {targets!r} and --target-file both name targets; give only one of them")
    return load_target(country, targets, target_file)
