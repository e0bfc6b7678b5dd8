"""Config errors and the collector that gathers every problem of one load in one pass."""

from __future__ import annotations


class ConfigError(Exception):
    """The configuration cannot be used.

    ``errors`` lists every problem found, each prefixed with the path of the offending
    field (``schedulingProfiles[0].plugins[2]: ...``); ``str()`` is one error per line.
    ``warnings`` are the non-fatal findings collected before the load failed.
    """

    def __init__(self, errors: list[str], warnings: list[str] | None = None) -> None:
        self.errors = list(errors) or ["invalid configuration"]
        self.warnings = list(warnings or [])
        super().__init__("\n".join(self.errors))

    def __str__(self) -> str:
        return "\n".join(self.errors)


class Problems:
    """Errors and warnings of one load, in the order they were found."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(f"{path}: {message}" if path else message)

    def warn(self, path: str, message: str) -> None:
        text = f"{path}: {message}" if path else message
        if text not in self.warnings:
            self.warnings.append(text)

    def raise_if_any(self) -> None:
        if self.errors:
            raise ConfigError(self.errors, self.warnings)
