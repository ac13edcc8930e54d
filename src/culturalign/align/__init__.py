"""Align: search a soft prompt that moves the model's measured profile to a target culture.

`config` holds `AlignConfig` (every setting, checked on construction, light to import); `objective`
turns search candidates into one full survey each (`SurveyObjective`, with the capability and contrast
terms); `run` holds the `Aligner` (one run = one output folder, checkpointed and resumable); `report`
writes its report.md and plots.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    """`culturalign.align(country, budget=..., ...)` runs `culturalign.api.align`: the front door's call has the
    name of this package, and a package attribute cannot be a function once the package is imported."""

    def __call__(self, *args, **kwargs):
        from culturalign.api import align

        return align(*args, **kwargs)

    @property
    def __signature__(self):  # inspect.signature / help in notebooks show the call's parameters
        import inspect

        from culturalign.api import align

        return inspect.signature(align)


sys.modules[__name__].__class__ = _CallablePackage
