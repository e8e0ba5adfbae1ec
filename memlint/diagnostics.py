"""Lint findings, their severities, and in-source suppression comments."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Iterable


class Severity(str, Enum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


@dataclass(frozen=True)
class Diagnostic:
    """One finding: where, which rule, how bad, what it says and how to fix it."""

    path: str
    line: int
    column: int
    code: str
    severity: Severity
    message: str
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["severity"] = self.severity.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Diagnostic":
        return cls(**{**data, "severity": Severity(data["severity"])})

    def sort_key(self) -> tuple[str, int, int, str]:
        return (self.path, self.line, self.column, self.code)


_NOQA = re.compile(r"#\s*noqa(?::\s*(?P<codes>[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*))?", re.IGNORECASE)
_IGNORE = re.compile(r"#\s*memlint:\s*ignore(?:\[(?P<codes>[^\]]*)\])?", re.IGNORECASE)


def suppressed_codes(line_text: str) -> set[str] | None:
    """Codes suppressed on a source line; an empty set means all codes, None means none.

    Understands ``# noqa``, ``# noqa: MEM001, DEV002`` and ``# memlint: ignore[MEM001]``.
    """
    for pattern in (_NOQA, _IGNORE):
        match = pattern.search(line_text)
        if match:
            codes = match.group("codes")
            if not codes:
                return set()
            return {code.strip().upper() for code in codes.split(",") if code.strip()}
    return None


def is_suppressed(diagnostic: Diagnostic, source_lines: list[str]) -> bool:
    if not 1 <= diagnostic.line <= len(source_lines):
        return False
    codes = suppressed_codes(source_lines[diagnostic.line - 1])
    return codes is not None and (not codes or diagnostic.code in codes)


def code_matches(code: str, selectors: Iterable[str]) -> bool:
    """True when ``code`` is named by a selector: a full code, a prefix (``DEV``, ``MEM00``) or ``ALL``."""
    return any(sel == "ALL" or code.startswith(sel) for sel in selectors)
