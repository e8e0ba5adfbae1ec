"""A status line on the terminal while model analyses run in child processes (they take seconds).

Shown on stderr only when stderr is a terminal and the output is for people (``text``/``rich``):
never in JSON, SARIF, GitHub or JUnit output, never in a pipe or a CI log.
"""
from __future__ import annotations

import sys
from typing import Any, TextIO


class AnalysisStatus:
    """Context manager; call the instance as ``progress(label, done, total)`` (engine.run_check's hook)."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and _is_terminal(self.stream)
        self._status: Any = None

    def __enter__(self) -> "AnalysisStatus":
        return self

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from rich.text import Text

        text = Text(f"memlint: analysing models ({done}/{total} done): {label}")
        if self._status is None:
            from rich.console import Console

            console = Console(file=self.stream, highlight=False)
            self._status = console.status(text, spinner="dots")
            self._status.start()
        else:
            self._status.update(text)

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
