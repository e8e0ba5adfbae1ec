"""``--output-format github``: GitHub Actions workflow commands, one annotation per finding.

``::error file=F,line=L,col=C,title=memlint (CODE)::CODE message`` (``warning`` and ``notice``
for the other severities), escaped as GitHub's toolkit (@actions/core) escapes them. Files are
named relative to the repository root, as GitHub resolves them. Analysis errors are ``E001``
error annotations.
"""
from __future__ import annotations

from typing import TextIO

from memlint.diagnostics import Severity
from memlint.engine import CheckResult
from memlint.reporters._common import findings, repository_path
from memlint.units import format_gib

COMMANDS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def escape_data(text: str) -> str:
    """The message after ``::`` (toolkit's escapeData)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """A ``key=value`` property (toolkit's escapeProperty): also ``:`` and ``,``."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def command(name: str, properties: dict[str, object], message: str) -> str:
    props = ",".join(f"{key}={escape_property(str(value))}" for key, value in properties.items() if value is not None)
    return f"::{name}{' ' + props if props else ''}::{escape_data(message)}"


def report(result: CheckResult, out: TextIO, _color: bool) -> None:
    for row in findings(result):
        path = repository_path(result, row.path) if row.path else None
        properties: dict[str, object] = {"file": path or row.path}
        if row.path:
            properties.update(line=row.line, col=row.column)
        properties["title"] = f"memlint ({row.code})"
        message = f"{row.code} {row.message}" + (f"\nhelp: {row.fix}" if row.fix else "")
        out.write(command(COMMANDS[row.severity], properties, message) + "\n")
    # Plain log lines (not commands): what was analysed, for whoever reads the job's log.
    for model in result.reports:
        verdict = "fits" if model.peak_device_bytes <= model.budget_bytes else "does NOT fit"
        out.write(f"memlint: {model.path}: {model.name} on {model.target} at batch size {model.batch_size}: "
                  f"{format_gib(model.peak_device_bytes)} GiB of a {format_gib(model.budget_bytes)} GiB budget, "
                  f"{verdict}; largest batch size that fits: {model.max_batch_size or 'none'}\n")
