"""``--output-format json``: one document, version 1 of the contract described in the README."""
from __future__ import annotations

import json
from typing import TextIO

from memlint.engine import CheckResult
from memlint.report import JSON_VERSION


def report(result: CheckResult, out: TextIO, _color: bool) -> None:
    document = {
        "version": JSON_VERSION,
        "diagnostics": [d.to_json() for d in result.diagnostics],
        "models": [r.to_json() for r in result.reports],
        "errors": [{"path": e.path, "line": e.line, "message": e.message, "hint": e.hint} for e in result.errors],
    }
    json.dump(document, out, indent=2)
    out.write("\n")
