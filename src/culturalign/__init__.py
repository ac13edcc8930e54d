"""culturalign: align a frozen language model with a culture's measured values.

Measure a model's Hofstede profile with the VSM 2013 (`survey`), and move it towards a country's
published scores with a soft prompt searched by a black-box optimizer (`align`).

The subpackages follow the pipeline: `measure` (questionnaire -> prompts -> answer distributions ->
indices -> L1), `backends` (the frozen model behind one interface), `softprompt` (the tensor and its
parameterisations), `search` (the optimizer protocol, registry and loop), `alignment` (settings, objective,
the checkpointed run and its report), `heldout` (checks on items and tasks the search never saw),
`experiments` (grids of runs), `committee` (experts, router, composition) and `serve` (the HTTP API);
`display` holds what every report shares, `errors` and `files` the rest.
"""

from culturalign.errors import CulturalignError
from culturalign.measure.instrument import Instrument, load_instrument
from culturalign.measure.targets import Target, load_target, load_target_set

__version__ = "0.1.0"

# The front door (culturalign.api), resolved on first use so that `import culturalign` imports no torch.
# The align run itself lives in the `culturalign.alignment` subpackage, so `ca.align` is free for the call.
_API = ("survey", "align", "ask", "load_model", "Profile", "Alignment", "Answer")

__all__ = ["CulturalignError", "Instrument", "load_instrument", "Target", "load_target", "load_target_set", *_API]


def __getattr__(name: str):
    import importlib

    if name == "Answer":
        return importlib.import_module("culturalign.committee.compose").Answer
    if name in _API:
        return getattr(importlib.import_module("culturalign.api"), name)
    raise AttributeError(f"module 'culturalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
