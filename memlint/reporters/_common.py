"""What the machine-readable formats share: findings as uniform rows, and paths from the repository root.

Model-analysis errors (``result.errors``) are not lint findings, but CI must see them in every
format, so they become rows with code ``E001`` and severity error; a file that cannot be read
is ``E902`` and a syntax error ``E999``, as in ruff.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from memlint.diagnostics import Severity
from memlint.engine import CheckResult

ANALYSIS_ERROR = "E001"

# Codes that are not rules of memlint.rules: (name, summary, description).
BUILTIN_CODES = {
    ANALYSIS_ERROR: ("model-analysis-error", "The model file could not be imported, built, traced or simulated",
                     "memlint imports a model file in a child process, builds its models on fake tensors and "
                     "simulates a training step. When that fails (an import error, a constructor that needs "
                     "arguments, a shape mismatch in forward, a timeout or the memory limit), no memory estimate "
                     "exists and the check exits with code 2. The message says what failed and what to do."),
    "E902": ("io-error", "The file cannot be read as UTF-8 Python source",
             "memlint reads Python sources as UTF-8 (PEP 3120); a file that cannot be read or decoded is reported "
             "here instead of being linted."),
    "E999": ("syntax-error", "The file is not valid Python",
             "memlint parses every file it lints; a file with a syntax error is reported here and not linted "
             "further."),
}


@dataclass(frozen=True)
class Finding:
    """A diagnostic or an analysis error, the way SARIF, GitHub and JUnit show them."""

    path: str | None
    line: int
    column: int
    code: str
    severity: Severity
    message: str
    fix: str = ""
    is_error: bool = False  # an analysis error (exit code 2), not a lint finding


def findings(result: CheckResult) -> list[Finding]:
    """Analysis errors first (they make the exit code 2), then the diagnostics in their order."""
    rows = [Finding(error.path, error.line or 1, 1, ANALYSIS_ERROR, Severity.ERROR,
                    error.message + (f" (hint: {error.hint})" if error.hint else ""), is_error=True)
            for error in result.errors]
    rows += [Finding(d.path, d.line, d.column, d.code, d.severity, d.message, d.fix) for d in result.diagnostics]
    return rows


def code_counts(result: CheckResult) -> Counter[str]:
    return Counter(row.code for row in findings(result))


def repository_root(start: Path) -> Path:
    """The nearest folder at or above ``start`` with a ``.git`` (a folder, or a file in worktrees); else ``start``."""
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / ".git").exists():
            return folder
    return start


def repository_path(result: CheckResult, path: str) -> str | None:
    """``path`` (relative to the folder memlint ran from) relative to the repository root, POSIX style.

    None when the file lies outside the repository; GitHub resolves annotations and SARIF
    locations against the repository root.
    """
    root = Path(result.root) if result.root else Path.cwd()
    absolute = (root / path).resolve() if not Path(path).is_absolute() else Path(path).resolve()
    try:
        return PurePosixPath(absolute.relative_to(repository_root(root)).as_posix()).as_posix()
    except ValueError:
        return None


def absolute_path(result: CheckResult, path: str) -> Path:
    root = Path(result.root) if result.root else Path.cwd()
    return (root / path).resolve() if not Path(path).is_absolute() else Path(path)
