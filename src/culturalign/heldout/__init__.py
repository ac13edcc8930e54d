"""Held-out checks of an aligned soft prompt: paraphrased items, reversed options, multiple-choice
knowledge and perplexity, each measured without and with the prompt.

    mcq.py         question files (own format, CulturalBench-Easy/-Hard), validation, scoring by option letter
    perplexity.py  perplexity of a neutral text through `Backend.loglikelihood`
    checks.py      `run_heldout` (all checks, JSON-safe) and `heldout_markdown` (a table)
    tables.py      rich tables for the terminal
"""

from culturalign.heldout.checks import heldout_markdown, kept_share, run_heldout

__all__ = ["run_heldout", "heldout_markdown", "kept_share"]
