"""``--output-format sarif``: SARIF 2.1.0, as GitHub code scanning reads it (github/codeql-action/upload-sarif).

One run; ``tool.driver`` lists every rule (id, name, short and full description, help as text
and markdown from ``Rule.explain()``, default level) plus the built-in error codes; each result
has its rule, level, message and a location relative to the repository root (``%SRCROOT%``).
Analysis errors are ``E001`` results of level error, and make the invocation unsuccessful.
"""
from __future__ import annotations

import json
from typing import Any, TextIO

from memlint import __version__
from memlint.diagnostics import Severity
from memlint.engine import CheckResult
from memlint.reporters._common import BUILTIN_CODES, Finding, absolute_path, findings, repository_path

SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
LEVELS = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


def _rule_descriptors() -> list[dict[str, Any]]:
    from memlint.rules.base import all_rules

    descriptors = []
    for rule in all_rules():
        text = rule.explain()
        descriptors.append({
            "id": rule.code, "name": rule.name,
            "shortDescription": {"text": rule.summary},
            "fullDescription": {"text": " ".join(rule.what.split())},
            "help": {"text": text, "markdown": text},
            "defaultConfiguration": {"level": LEVELS[rule.severity]},
            "properties": {"tags": ["memlint", "model" if rule.needs_model else "static"]},
        })
    for code, (name, summary, description) in BUILTIN_CODES.items():
        descriptors.append({
            "id": code, "name": name, "shortDescription": {"text": summary},
            "fullDescription": {"text": description},
            "help": {"text": description, "markdown": description},
            "defaultConfiguration": {"level": "error"},
            "properties": {"tags": ["memlint", "error"]},
        })
    return descriptors


def _location(result: CheckResult, row: Finding) -> list[dict[str, Any]]:
    if not row.path:
        return []
    relative = repository_path(result, row.path)
    artifact = ({"uri": relative, "uriBaseId": "%SRCROOT%"} if relative is not None
                else {"uri": absolute_path(result, row.path).as_uri()})
    return [{"physicalLocation": {"artifactLocation": artifact,
                                  "region": {"startLine": max(1, row.line), "startColumn": max(1, row.column)}}}]


def sarif_document(result: CheckResult) -> dict[str, Any]:
    rules = _rule_descriptors()
    index = {rule["id"]: i for i, rule in enumerate(rules)}
    results = []
    for row in findings(result):
        text = row.message + (f"\nHelp: {row.fix}" if row.fix else "")
        item: dict[str, Any] = {"ruleId": row.code, "level": LEVELS[row.severity], "message": {"text": text},
                                "locations": _location(result, row)}
        if row.code in index:
            item["ruleIndex"] = index[row.code]
        if not item["locations"]:
            del item["locations"]
        results.append(item)
    notifications = [{"level": "error", "message": {"text": error.render()}, "descriptor": {"id": "E001"}}
                     for error in result.errors]
    models = [{"path": r.path, "name": r.name, "target": r.target, "batch_size": r.batch_size,
               "peak_device_bytes": r.peak_device_bytes, "budget_bytes": r.budget_bytes,
               "max_batch_size": r.max_batch_size} for r in result.reports]
    return {
        "$schema": SCHEMA,
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "memlint", "version": __version__, "semanticVersion": __version__,
                                "rules": rules}},
            "invocations": [{"executionSuccessful": not result.errors,
                             "toolExecutionNotifications": notifications}],
            "columnKind": "unicodeCodePoints",
            "results": results,
            "properties": {"models": models},
        }],
    }


def report(result: CheckResult, out: TextIO, _color: bool) -> None:
    json.dump(sarif_document(result), out, indent=2)
    out.write("\n")

