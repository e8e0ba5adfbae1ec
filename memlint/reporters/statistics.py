"""``--statistics``: how many findings each rule produced, instead of the findings (as ruff's).

Text: ``count  CODE  name`` per code, most frequent first. JSON (with ``--output-format json``):
a list of ``{"code", "name", "count"}``. Analysis errors count as ``E001``.
"""
from __future__ import annotations

import json
from typing import TextIO

from memlint.engine import CheckResult
from memlint.reporters._common import BUILTIN_CODES, code_counts

STATISTICS_FORMATS = ("text", "rich", "json")


def _rows(result: CheckResult) -> list[dict[str, object]]:
    from memlint.rules.base import get_rule

    rows = []
    for code, count in sorted(code_counts(result).items(), key=lambda item: (-item[1], item[0])):
        rule = get_rule(code)
        name = rule.name if rule is not None else BUILTIN_CODES.get(code, ("",))[0]
        rows.append({"code": code, "name": name, "count": count})
    return rows


def report_text(result: CheckResult, out: TextIO, _color: bool) -> None:
    rows = _rows(result)
    width = max((len(str(row["count"])) for row in rows), default=1)
    for row in rows:
        out.write(f"{row['count']:>{width}}\t{row['code']}\t{row['name']}\n")


def report_json(result: CheckResult, out: TextIO, _color: bool) -> None:
    json.dump(_rows(result), out, indent=2)
    out.write("\n")
