"""`culturalign experiment`: a grid of align runs from one file, resumable cell by cell, and its report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

import culturalign.cli.common as common
import culturalign.cli.options as o
from culturalign.cli.common import Command, console, out

app = typer.Typer()


EXPERIMENT_EPILOG = ("Rerun the same command to continue: finished cells are skipped, an interrupted one resumes, and a "
                     "larger grid.budget extends them. See experiments/paper.yaml for the file's keys.")


@app.command(cls=Command, epilog=EXPERIMENT_EPILOG)
def experiment(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Experiment file: .yaml, .yml or .toml (grid of targets x optimizers x seeds, settings)."),
    out_dir: Annotated[Optional[Path], o.out(
        "Experiment folder: new, empty, or one this file started (default runs/experiments/<name>).")] = None,
    executor: str = typer.Option("local", "--executor", metavar="NAME", help="local: the cells one after the other in this process; ray: one Ray task per cell."),
    address: Optional[str] = typer.Option(None, "--address", metavar="ADDR", help="Ray cluster to join, e.g. auto or ray://head:10001 (default: start a local one)."),
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", metavar="N", help="CPUs of the local Ray cluster started here (default: all)."),
    cell_timeout: Optional[float] = typer.Option(None, "--cell-timeout", metavar="S", help="Ray only: cancel a cell still running after S seconds (model load included); its checkpoint is kept."),
    model: Annotated[Optional[str], o.model("Use this model instead of the file's: " + o.MODEL_HELP)] = None,
    device: o.DeviceDefaultCuda = None,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the cells and what each needs (new, resume, extend, done), then exit; writes nothing."),
    heldout: Annotated[bool, o.heldout(
        "Then run the held-out checks (`culturalign heldout`: paraphrases, reversed options, MCQ, perplexity) on every "
        "finished cell that lacks them, in this process, and add them to cells.csv and report.md.")] = False,
):
    """Run a grid of align runs (targets x optimizers x seeds) and report them: cells.csv, curves.csv, report.md.

    Each cell is an ordinary align output folder under DIR/cells/. Everything in the file is checked before the
    model loads. Example: culturalign experiment experiments/paper.yaml --executor ray
    """
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
    progress = common.progress_bar("{task.fields[unit]}", "{task.fields[best]}", transient=True)
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

        lm = common.load_model(device=device, model=exp.model)
        with console.status("held-out checks ...") as status:
            n = run_heldout_cells(exp, out_dir, states, lm, on_cell=lambda st, i, k: status.update(
                f"held-out checks: {escape(st.cell.name)} ({i + 1} of {k})"))
        console.print(f"held-out checks of {n} cell(s) -> cells/<cell>/heldout.json", highlight=False)
    for line in summary_lines(rows):
        out.print(line, highlight=False, soft_wrap=True, markup=False)
    console.print(f"{result.ran} cell(s) run, {len(states) - result.ran} already finished; cells.csv, curves.csv, report.md, "
                  f"plots -> {escape(str(out_dir))}", highlight=False, soft_wrap=True)
