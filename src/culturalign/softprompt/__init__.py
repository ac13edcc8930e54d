"""Soft prompt: the tensor the search moves, and how search coordinates become one.

`prompt` holds `SoftPrompt` (the [n, hidden] embeddings prepended at position 0, saved and loaded as a
PEFT prompt-tuning folder); `params` holds the starting prompt (`initial_prompt`) and the
parameterisations the optimizers search (`FullPrompt`, the BBT `Projection`). Kept light: this module
imports nothing, so the settings (`align.config`) can read `INITS` without torch.
"""

INITS = ("text", "vocab", "random")  # how a soft prompt starts (`params.initial_prompt`)
