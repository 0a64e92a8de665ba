"""Error types. Each carries every problem found, not just the first."""

from __future__ import annotations


class WeightsError(ValueError):
    """A weights file cannot be used. `problems` lists every reason, `source` names the file."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = f"{source}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{source}: {len(self.problems)} problems:\n{lines}"
        super().__init__(message)


class WeightsFormatError(WeightsError):
    """The bytes are not a well-formed safetensors file."""


class WeightsWarning(UserWarning):
    """Something about a weights file the runtime accepts but the user should know (one line)."""
