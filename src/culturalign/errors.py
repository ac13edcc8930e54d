"""One exception type for every user-facing failure.

The CLI prints `CulturalignError` as a single red line (no traceback): raise it with a message
that names the input and says what was expected.
"""


class CulturalignError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""
