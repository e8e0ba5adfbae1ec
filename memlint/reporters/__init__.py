"""Reporters turn a CheckResult into text; they format what the engine computed and never compute."""
from __future__ import annotations

from typing import Callable, TextIO

from memlint.engine import CheckResult

Reporter = Callable[[CheckResult, TextIO, bool], None]


def get_reporter(name: str) -> Reporter:
    from memlint.reporters import github, json_format, junit, sarif, text

    reporters: dict[str, Reporter] = {"text": text.report, "rich": text.report_rich, "json": json_format.report,
                                      "sarif": sarif.report, "github": github.report, "junit": junit.report}
    return reporters[name]


def get_statistics_reporter(name: str) -> Reporter:
    """``--statistics``: counts per rule, as text (``text``/``rich``) or JSON (``json``)."""
    from memlint.errors import UsageError
    from memlint.reporters import statistics

    if name not in statistics.STATISTICS_FORMATS:
        raise UsageError(f"--statistics prints text or json, not {name}",
                         hint="drop --statistics, or use --output-format text or json")
    return statistics.report_json if name == "json" else statistics.report_text


FORMATS = ("text", "rich", "json", "sarif", "github", "junit")
# Formats that other programs read: nothing else may be written with them (no progress display).
MACHINE_FORMATS = ("json", "sarif", "github", "junit")
