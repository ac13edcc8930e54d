"""The `culturalign` command line (Typer). Every user error is one red line, never a traceback.

`main()` runs the Typer app without click's standalone handling, so usage errors (an unknown option,
a value of the wrong type), `CulturalignError`s and Ctrl-C all end the same way: one line on stderr
naming the input and what was expected, and exit status 2 (130 for an interrupt).

One module per command group, following the pipeline: `measure` (countries, survey), `align`,
`committee` (ask, experts build/list, committee eval), `serve`, `experiment`, `heldout` (mcq, heldout).
`options` declares every option that more than one command takes, once; `common` holds the consoles,
the progress bar, the error line and the input checks the commands share. Importing this package
loads no model library: each command imports what it needs when it runs.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from culturalign.cli import align, committee, experiment, heldout, measure, serve
from culturalign.cli.common import Group, console, error_line
from culturalign.errors import CulturalignError

__all__ = ["app", "error_text", "main", "run"]


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


# The commands in the order `culturalign --help` lists them, then the two command groups.
for _module in (measure, align, committee, serve, experiment, heldout):
    app.add_typer(_module.app)
app.add_typer(committee.experts_app, name="experts")
app.add_typer(committee.committee_app, name="committee")


def error_text(error: CulturalignError) -> str:
    """The error as the command line says it: a setting's field shown as its flag (`popsize` -> `--popsize`)."""
    from culturalign.errors import ConfigError

    if isinstance(error, ConfigError):
        from culturalign.alignment.config import flag

        return error.named(flag)
    return str(error)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on `argv` (default: sys.argv[1:]) and return the exit status; never raises."""
    from typer._click import exceptions as click_errors  # Typer vendors click

    try:
        code = app(args=argv, prog_name="culturalign", standalone_mode=False)
    except CulturalignError as e:
        error_line(error_text(e))
        return 2
    except click_errors.NoArgsIsHelpError:  # the help has been printed
        return 0
    except click_errors.ClickException as e:
        ctx = getattr(e, "ctx", None)
        where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        error_line(f"{e.format_message()}{where}")
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
