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
from memlint.settings import INPUT_DTYPES, MODES, OPTIMIZERS, PRECISIONS, STRATEGIES

DEFAULT_OUTPUT = "memlint-report.html"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    report = commands.add_parser("report", help="write an HTML page: memory timeline and per-layer bars")
    report.add_argument("file", help="the model file to analyse")
    report.add_argument("--target", action="append", dest="targets", metavar="NAME[:SIZE]",
                        help="device to judge against (repeatable), e.g. gtx1050ti, cpu:8GiB, mem:4GiB")
    report.add_argument("--batch-size", type=int, help="batch size of the simulated step")
    report.add_argument("--input-shape", help="per-sample input shape, e.g. 3,224,224")
    report.add_argument("--input-dtype", choices=INPUT_DTYPES)
    report.add_argument("--optimizer", choices=OPTIMIZERS)
    report.add_argument("--precision", choices=PRECISIONS)
    report.add_argument("--mode", choices=MODES)
    report.add_argument("--threshold", type=float, help="share of the target's memory a plan may use (default 0.8)")
    report.add_argument("--model", help="the class or function in the file to analyse")
    report.add_argument("--strategy", choices=STRATEGIES,
                        help="data parallelism to judge per device: ddp, fsdp, zero1, zero2, zero3 (default none)")
    report.add_argument("--devices", type=int, help="number of devices of --strategy (default 1)")
    report.add_argument("--checkpoint-layers", action="store_true", default=None,
                        help="simulate with each top-level block under activation checkpointing")
    report.add_argument("--depth", type=int, help="module depth of the per-layer bars (default 3)")
    report.add_argument("--timeout", type=float, help="seconds for the analysis (default 60)")
    report.add_argument("--memory-limit", help="memory limit of the analysis process (default 8GiB; 'none')")
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
