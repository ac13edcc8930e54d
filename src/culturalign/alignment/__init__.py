"""Alignment: search a soft prompt that moves the model's measured profile to a target culture.

`config` holds `AlignConfig` (every setting, checked on construction, light to import); `objective`
turns search candidates into one full survey each (`SurveyObjective`, with the capability and contrast
terms); `run` holds the `Aligner` (one run = one output folder, checkpointed and resumable); `report`
writes its report.md and plots.
"""
