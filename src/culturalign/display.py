"""What every report shares: one number format, one convergence plot, and quiet libraries.

Each stage writes its own report (`measure.report`, `align.report`, `experiments.report`,
`heldout.tables`, `committee.report`); the helpers they have in common live here, so a table cell or
a convergence curve looks the same wherever it appears. `quiet_libraries` keeps the libraries' own
logs and download bars out of that output (the command line and the benchmarks call it).
"""

from __future__ import annotations

import logging
import math
import os
import warnings


def quiet_libraries() -> None:
    """Silence what the libraries print on their own: transformers' warnings and progress bars, FutureWarnings,
    the tokenizers' fork warning; other loggers show warnings only. Imports transformers (not torch's models)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.basicConfig(format="%(message)s", level=logging.WARNING)


def fmt(x, nd: int = 1) -> str:
    """A number with `nd` decimals; "-" for a missing (None) or non-finite value."""
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def convergence_plot(path, curves: list[dict], lines: list[tuple] = (), *, ylabel: str, title: str | None = None,
                     size: tuple[float, float] = (7, 4), dpi: int = 120, legend: dict | None = None) -> None:
    """Loss (or L1) against candidate evaluations, written as a PNG to `path` (atomically).

    `curves`: one dict per curve, `x`, `y`, `label` and matplotlib `style` (keyword arguments of `plot`), and
    optionally `band` = (low, high), shaded in the curve's colour. `lines`: horizontal references
    (value, label, color, linestyle)."""
    from culturalign.files import atomic_write

    plt = pyplot()
    fig, ax = plt.subplots(figsize=size)
    for c in curves:
        line, = ax.plot(c["x"], c["y"], label=c["label"], **c.get("style", {}))
        if c.get("band") is not None:
            ax.fill_between(c["x"], *c["band"], step="post", alpha=0.2, color=line.get_color())
    for value, label, color, linestyle in lines:
        ax.axhline(value, color=color, linestyle=linestyle, label=label)
    ax.set_xlabel("candidate evaluations (full surveys)")
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, **(legend or {}))
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    plt.close(fig)
