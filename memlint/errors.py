"""Errors memlint reports to the user as one clear paragraph (exit code 2), never a traceback."""
from __future__ import annotations


class MemlintError(Exception):
    """A problem memlint explains to the user; ``path``/``line`` locate it when known."""

    exit_code = 2

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.hint = hint

    def render(self) -> str:
        where = ""
        if self.path:
            where = f"{self.path}:{self.line}: " if self.line else f"{self.path}: "
        text = f"error: {where}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class UsageError(MemlintError):
    """Wrong command-line usage (unknown target, bad shape string, ...)."""


class ConfigError(MemlintError):
    """A malformed pyproject.toml or a wrong value in [tool.memlint]."""


class ModelError(MemlintError):
    """The user's model file could not be imported, built, traced or simulated."""
