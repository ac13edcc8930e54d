"""One exception type for every user-facing failure (and `ConfigError`, its kind for a setting out of range).

The CLI prints `CulturalignError` as a single red line (no traceback): raise it with a message
that names the input and says what was expected.
"""


class CulturalignError(Exception):
    """A problem with the user's input or environment, explained in one sentence."""


_MARK = "\x1f"  # brackets a field name inside a ConfigError's message


def field(name: str) -> str:
    """A settings field named in a `ConfigError` message: shown as the field, or as the CLI's flag for it."""
    return f"{_MARK}{name}{_MARK}"


class ConfigError(CulturalignError):
    """A setting out of range. The message names the field (`DEConfig(popsize=2)`: "popsize must be ..."); the
    command line shows the same message with its flag for the field instead (`named(flag)`)."""

    @property
    def fields(self) -> list[str]:
        """The fields the message names, in order."""
        return self.args[0].split(_MARK)[1::2]

    def named(self, name=lambda f: f) -> str:
        """The message with each field shown as `name(field)`."""
        parts = self.args[0].split(_MARK)
        return "".join(name(p) if i % 2 else p for i, p in enumerate(parts))

    def renamed(self, mapping: dict[str, str]) -> "ConfigError":
        """The same error about other fields (e.g. a method's setting -> the run setting that feeds it)."""
        parts = self.args[0].split(_MARK)
        return ConfigError("".join(field(mapping.get(p, p)) if i % 2 else p for i, p in enumerate(parts)))

    def __str__(self) -> str:
        return self.named()
