"""``memlint report FILE --target T [-o report.html]``: analyse FILE's models and write the HTML page.

The analysis is the one ``memlint check`` runs (same options, same child process); the page
is drawn by ``memlint.reporters.html`` (plotly, the ``report`` extra).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from memlint.errors import ModelError, UsageError

DEFAULT_OUTPUT = "memlint-report.html"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    from memlint.cli import add_analysis_options

    report = commands.add_parser("report", help="write an HTML page: memory timeline and per-layer bars")
    report.add_argument("file", help="the model file to analyse")
    add_analysis_options(report)
    report.add_argument("-o", "--output-file", default=DEFAULT_OUTPUT, help=f"the page to write ({DEFAULT_OUTPUT})")
    report.add_argument("--config", help="pyproject.toml to read [tool.memlint] from")
    report.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    return report


class _WithDefaults(argparse.Namespace):
    """``check``'s options that ``report`` does not take read as None (their defaults)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def run_report_command(args: argparse.Namespace, out: TextIO) -> int:
    from memlint.cli import settings_from_args
    from memlint.engine import run_check
    from memlint.progress import AnalysisStatus
    from memlint.reporters.html import render, require_plotly

    require_plotly()
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{args.file}: no such file", hint="memlint report analyses one model file")
    args.paths = [args.file]
    settings = settings_from_args(_WithDefaults(**vars(args)))
    # The file is named to be analysed: a `models` entry that matches it keeps its model name,
    # anything else matches "*".
    settings = settings.merged(models=(*settings.models, "*"), no_import=False)
    root = Path(settings.config_path).parent if settings.config_path else Path.cwd()
    with AnalysisStatus(enabled=True) as status:
        result = run_check([args.file], settings, root, debug=args.debug, progress=status)
    for error in result.errors:
        print(error.render(), file=sys.stderr)
    if result.errors:
        return 2
    if not result.reports:
        raise ModelError("no model found", path=args.file,
                         hint="define an nn.Module subclass or a zero-argument build_model(), or pass --model NAME")
    with open(args.output_file, "w", encoding="utf-8") as handle:
        handle.write(render(result))
    names = ", ".join(f"{r.name} on {r.target}" for r in result.reports)
    out.write(f"wrote {args.output_file} ({names})\n")
    return 0
