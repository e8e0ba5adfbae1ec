"""The ``memlint`` command: ``check``, ``report``, ``server``, ``targets`` and ``rule``.

Exit codes as ruff: 0 no findings, 1 findings, 2 usage, configuration or internal error.
Nothing here imports torch; model analysis runs in child processes (``memlint.worker``).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence, TextIO

from memlint import __version__
from memlint.errors import MemlintError, UsageError
from memlint.settings import INPUT_DTYPES, MODES, OPTIMIZERS, PRECISIONS, STRATEGIES, Settings, find_pyproject, \
    load_settings, parse_shape

EXIT_CLEAN, EXIT_FINDINGS, EXIT_ERROR = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as MemlintError (exit 2, one paragraph)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message, hint=f"see `{self.prog} --help`")


def _codes(text: str) -> tuple[str, ...]:
    return tuple(code.strip().upper() for code in text.split(",") if code.strip())


def add_analysis_options(parser: argparse.ArgumentParser) -> None:
    """The options that shape a model analysis, shared by ``check`` and ``report``."""
    parser.add_argument("--target", action="append", dest="targets", metavar="NAME[:SIZE]",
                        help="device to judge against (repeatable), e.g. gtx1050ti, cpu:8GiB, mem:4GiB")
    parser.add_argument("--batch-size", type=int, help="batch size of the simulated step")
    parser.add_argument("--input-shape", help="per-sample input shape, e.g. 3,224,224")
    parser.add_argument("--input-dtype", choices=INPUT_DTYPES)
    parser.add_argument("--optimizer", choices=OPTIMIZERS)
    parser.add_argument("--precision", choices=PRECISIONS)
    parser.add_argument("--mode", choices=MODES)
    parser.add_argument("--threshold", type=float, help="share of the target's memory a plan may use (default 0.8)")
    parser.add_argument("--model", help="the class or function in the file to analyse")
    parser.add_argument("--depth", type=int, help="module depth shown in the layer table (default 3)")
    parser.add_argument("--timeout", type=float, help="seconds per analysed file (default 60)")
    parser.add_argument("--memory-limit", help="memory limit of the analysis process (default 8GiB; 'none')")
    parser.add_argument("--strategy", choices=STRATEGIES,
                        help="data parallelism to judge per device: ddp, fsdp, zero1, zero2, zero3 (default none)")
    parser.add_argument("--devices", type=int, help="number of devices of --strategy (default 1)")
    parser.add_argument("--checkpoint-layers", action="store_true", default=None,
                        help="simulate with each top-level block under activation checkpointing")
    parser.add_argument("--no-cache", action="store_false", dest="cache", default=None,
                        help="analyse afresh, not from the answers kept for unchanged models (memlint.cache)")


def build_parser() -> argparse.ArgumentParser:
    from memlint.reporters import FORMATS

    parser = _Parser(prog="memlint", description="Lint PyTorch models for memory before you rent a GPU.")
    parser.add_argument("--version", action="version", version=f"memlint {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    check = commands.add_parser("check", help="analyse model files and lint training code")
    check.add_argument("paths", nargs="*", default=["."], help="files or directories (default: .)")
    add_analysis_options(check)
    check.add_argument("--select", type=_codes, help="rule codes or prefixes to enable (default ALL)")
    check.add_argument("--ignore", type=_codes, help="rule codes or prefixes to disable")
    check.add_argument("--epoch-size", type=int, help="samples per epoch, for the time per epoch")
    check.add_argument("--no-import", action="store_true", default=None,
                       help="never import or run the analysed files: static rules only")
    check.add_argument("--output-format", choices=FORMATS, default="text",
                       help="text, rich, json, sarif (GitHub code scanning), github (Actions annotations), junit")
    check.add_argument("-o", "--output-file", help="write the report to this file")
    check.add_argument("--statistics", action="store_true", help="print the number of findings per rule instead")
    check.add_argument("--diff", "--changed-since", dest="diff", metavar="BASE",
                       help="check only the files changed since the git ref BASE (BASE...HEAD and uncommitted)")
    check.add_argument("--config", help="pyproject.toml to read [tool.memlint] from")
    check.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")

    from memlint.report_command import add_parser as add_report_parser

    add_report_parser(commands)
    server = commands.add_parser("server", help="a warm analysis process that checks fork from (Linux)")
    server.add_argument("action", choices=("start", "stop", "status"))
    server.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                        help="stop after this long without a request (default 3600)")
    server.add_argument("--json", action="store_true", help="print the server's state as one JSON object")
    commands.add_parser("targets", help="list the devices memlint knows")
    rule = commands.add_parser("rule", help="explain a rule")
    rule.add_argument("code", nargs="?", help="a rule code, e.g. MEM001")
    rule.add_argument("--all", action="store_true", help="list every rule")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    start = Path(args.paths[0]) if args.paths else Path.cwd()
    pyproject = Path(args.config) if args.config else find_pyproject(start if start.exists() else Path.cwd())
    if args.config and not pyproject.is_file():
        raise UsageError(f"--config {args.config}: no such file")
    settings = load_settings(pyproject)
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise UsageError(f"--threshold must be in (0, 1], not {args.threshold}")
    if args.batch_size is not None and args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, not {args.batch_size}")
    for flag, value in (("--devices", args.devices), ("--epoch-size", args.epoch_size)):
        if value is not None and value <= 0:
            raise UsageError(f"{flag} must be positive, not {value}")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    return settings.merged(
        targets=tuple(args.targets) if args.targets else None, batch_size=args.batch_size,
        input_shape=parse_shape(args.input_shape) if args.input_shape else None, input_dtype=args.input_dtype,
        optimizer=args.optimizer, precision=args.precision, mode=args.mode, threshold=args.threshold,
        model=args.model, select=args.select, ignore=args.ignore, depth=args.depth, timeout=args.timeout,
        memory_limit=args.memory_limit, strategy=args.strategy, devices=args.devices, no_import=args.no_import,
        checkpoint_layers=args.checkpoint_layers, epoch_size=args.epoch_size, cache=args.cache,
    )


def run_check_command(args: argparse.Namespace, out: TextIO) -> int:
    from memlint.engine import run_check
    from memlint.progress import AnalysisStatus
    from memlint.reporters import MACHINE_FORMATS, get_reporter, get_statistics_reporter

    settings = settings_from_args(args)
    root = Path(settings.config_path).parent if settings.config_path else Path.cwd()
    reporter = get_statistics_reporter(args.output_format) if args.statistics else get_reporter(args.output_format)
    with AnalysisStatus(enabled=args.output_format not in MACHINE_FORMATS) as status:
        result = run_check(args.paths, settings, root, debug=args.debug, changed_since=args.diff, progress=status)
    if args.output_file:
        with open(args.output_file, "w", encoding="utf-8") as handle:
            reporter(result, handle, False)
    else:
        reporter(result, out, out.isatty())
    if result.errors and (args.output_format not in ("text", "rich") or args.output_file or args.statistics):
        for error in result.errors:
            print(error.render(), file=sys.stderr)
    if result.errors:
        return EXIT_ERROR
    return EXIT_FINDINGS if result.diagnostics else EXIT_CLEAN


def run_targets_command(out: TextIO) -> int:
    from rich.console import Console
    from rich.table import Table

    from memlint.targets import builtin_targets
    from memlint.units import format_gib

    table = Table(title="memlint targets (--target NAME, NAME:SIZE, or mem:SIZE)", title_justify="left")
    for column in ("Name", "Kind", "Memory (GiB)", "CC", "Native dtypes", "Bandwidth (GB/s)", "Description"):
        table.add_column(column)
    for target in builtin_targets().values():
        table.add_row(target.name, target.kind, format_gib(target.memory_bytes, 1) if target.memory_bytes else "given",
                      target.compute_capability or "", ", ".join(sorted(target.native_dtypes)),
                      f"{target.memory_bandwidth / 1e9:.0f}" if target.memory_bandwidth else "", target.description)
    Console(file=out, width=160).print(table)
    return EXIT_CLEAN


def run_server_command(args: argparse.Namespace, out: TextIO) -> int:
    from memlint import server
    from memlint.worker import STARTUP_LIMIT

    if args.action == "start":
        idle = server.DEFAULT_IDLE_TIMEOUT if args.idle_timeout is None else args.idle_timeout
        if not idle > 0:
            raise UsageError(f"--idle-timeout must be a positive number of seconds, not {idle:g}")
        state = server.start(idle, STARTUP_LIMIT)
        if args.json:
            out.write(json.dumps({"running": True, **state}) + "\n")
        elif state.get("already"):
            out.write(f"memlint server: already running (pid {state['pid']})\n")
        else:
            out.write(f"memlint server: started (pid {state['pid']}, warm in {state['warm_up']:.1f} s); checks in "
                      f"this environment fork their analyses from it; it stops after "
                      f"{state['idle_timeout']:g} s without one, or with `memlint server stop`\n")
        return EXIT_CLEAN
    state = server.ask(args.action)
    if args.json:
        out.write(json.dumps({"running": state is not None, **(state or {})}) + "\n")
    elif state is None:
        out.write("memlint server: none running for this environment\n")
    elif args.action == "stop":
        out.write(f"memlint server: stopped (pid {state['pid']})\n")
    else:
        out.write(f"memlint server: running (pid {state['pid']}, up {time.time() - state['started']:.0f} s, "
                  f"{state['analyses']} analyses, {state['learned']} modules learned from them, "
                  f"stops after {state['idle_timeout']:g} s idle)\n")
    return EXIT_FINDINGS if state is None and args.action == "status" else EXIT_CLEAN


def run_rule_command(args: argparse.Namespace, out: TextIO) -> int:
    from memlint.rules.base import all_rules, get_rule

    if args.all or not args.code:
        for rule in all_rules():
            kind = "model" if rule.needs_model else "static"
            out.write(f"{rule.code}  {rule.name:<32} {kind:<7} {rule.summary}\n")
        return EXIT_CLEAN
    rule = get_rule(args.code)
    if rule is None:
        raise UsageError(f"unknown rule {args.code!r}", hint="`memlint rule --all` lists them")
    out.write(rule.explain())
    return EXIT_CLEAN


def main(argv: Sequence[str] | None = None) -> int:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        args = build_parser().parse_args(argv)
        if args.command == "check":
            return run_check_command(args, sys.stdout)
        if args.command == "targets":
            return run_targets_command(sys.stdout)
        if args.command == "server":
            return run_server_command(args, sys.stdout)
        if args.command == "report":
            from memlint.report_command import run_report_command

            return run_report_command(args, sys.stdout)
        return run_rule_command(args, sys.stdout)
    except MemlintError as exc:
        if debug:
            traceback.print_exc()
        print(exc.render(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # the analysis children were stopped with their process groups (engine)
        print("memlint: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # internal error: one paragraph unless --debug
        if debug:
            raise
        print(f"error: memlint failed unexpectedly: {type(exc).__name__}: {exc}\n"
              "  hint: rerun with --debug and report the traceback", file=sys.stderr)
        return EXIT_ERROR
