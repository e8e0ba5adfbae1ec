"""Reporters turn a CheckResult into text; they format what the engine computed and never compute."""
from __future__ import annotations

from typing import Callable, TextIO

from memlint.engine import CheckResult

Reporter = Callable[[CheckResult, TextIO, bool], None]


def get_reporter(name: str) -> Reporter:
    from memlint.reporters import json_format, text

    reporters: dict[str, Reporter] = {"text": text.report, "rich": text.report_rich, "json": json_format.report}
    return reporters[name]


FORMATS = ("text", "rich", "json")
