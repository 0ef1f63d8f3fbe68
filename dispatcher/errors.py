"""One error tree for the whole package.

Each exception's docstring is its default message::

    DispatcherError
    ├── ConfigError            the configuration file or environment is invalid (names the key path)
    ├── IntentInvalid          an intent was refused at intake (names each field and the reason)
    ├── BatchFileError         a batch file cannot be read as a whole (format, encoding, header)
    ├── UnknownIntent          no intent has that id
    ├── StoreUnavailable       the database cannot be reached; nothing was written
    ├── RoutingError           no provider department can be chosen for an intent (final)
    └── ProviderError          a provider answered in a way the client could not read
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class DispatcherError(Exception):
    """The dispatcher failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class ConfigError(DispatcherError):
    """The configuration is invalid."""


@dataclass(frozen=True)
class FieldProblem:
    """One reason an input was refused: the field's dotted path and why."""

    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class IntentInvalid(DispatcherError):
    """The intent was refused."""

    def __init__(self, problems: Sequence[FieldProblem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems) or None)


class BatchFileError(DispatcherError):
    """The batch file cannot be read; nothing was stored."""


class UnknownIntent(DispatcherError):
    """No intent has that id."""


class StoreUnavailable(DispatcherError):
    """The database cannot be reached; nothing was written."""


class RoutingError(DispatcherError):
    """No provider department can be chosen for this intent."""


class ProviderError(DispatcherError):
    """The provider answered in a way the client could not read."""
