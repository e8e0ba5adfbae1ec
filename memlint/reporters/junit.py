"""``--output-format junit``: JUnit XML for CI systems that show test reports (GitLab, Jenkins, Azure).

One ``<testsuite name="memlint">``; one ``<testcase>`` per file checked; a ``<failure>`` per
diagnostic of that file and an ``<error>`` per analysis error (code ``E001``). Counts follow
JUnit's meaning: ``tests`` test cases, ``failures`` those with findings, ``errors`` those that
could not be analysed.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import TextIO

from memlint.engine import CheckResult
from memlint.reporters._common import Finding, findings

SUITE = "memlint"


def _text(row: Finding) -> str:
    text = f"{row.path or SUITE}:{row.line}:{row.column}: {row.code} {row.message}"
    return text + (f"\nhelp: {row.fix}" if row.fix else "")


def junit_tree(result: CheckResult) -> ET.ElementTree:
    by_file: dict[str, list[Finding]] = {path: [] for path in result.files}
    for row in findings(result):
        by_file.setdefault(row.path or SUITE, []).append(row)
    failed = sum(1 for rows in by_file.values() if rows and not any(r.is_error for r in rows))
    errored = sum(1 for rows in by_file.values() if any(r.is_error for r in rows))
    counts = {"tests": str(len(by_file)), "failures": str(failed), "errors": str(errored), "skipped": "0"}
    suites = ET.Element("testsuites", name=SUITE, **counts)
    suite = ET.SubElement(suites, "testsuite", name=SUITE, **counts)
    for path, rows in by_file.items():
        case = ET.SubElement(suite, "testcase", name=path, classname=SUITE, file=path)
        for row in rows:
            tag = "error" if row.is_error else "failure"
            element = ET.SubElement(case, tag, message=f"{row.code} {row.message}", type=row.code)
            element.text = _text(row)
    ET.indent(suites)
    return ET.ElementTree(suites)


def report(result: CheckResult, out: TextIO, _color: bool) -> None:
    out.write('<?xml version="1.0" encoding="UTF-8"?>\n')
    out.write(ET.tostring(junit_tree(result).getroot(), encoding="unicode"))
    out.write("\n")
