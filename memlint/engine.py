"""Run a check: find files, lint them statically, analyse their models in child processes, apply rules.

The static part never imports torch or the user's code; model analysis happens only for
the files named on the command line or listed under ``models`` in ``[tool.memlint]``, and
only without ``--no-import``.
"""
from __future__ import annotations

import fnmatch
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from memlint.batchsize import BatchSizeSite, find_batch_size
from memlint.diagnostics import Diagnostic, Severity, code_matches, is_suppressed
from memlint.errors import MemlintError, UsageError
from memlint.report import ModelReport
from memlint.rules.base import Rule, RuleContext, all_rules
from memlint.settings import Settings
from memlint.targets import Target, resolve_target
from memlint.units import parse_bytes
from memlint.worker import DEFAULT_MEMORY_LIMIT, AnalysisRequest, error_from_json, run_in_child

DEFAULT_BATCH_SIZE = 32
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".tox", ".nox", "node_modules", "build",
             "dist", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".eggs"}


@dataclass
class SourceFile:
    """A file to lint: its path as the user sees it, its text, and whether to analyse its models."""

    path: Path
    display: str
    text: str = ""
    analyse: bool = False


@dataclass
class CheckResult:
    diagnostics: list[Diagnostic] = field(default_factory=list)
    reports: list[ModelReport] = field(default_factory=list)
    errors: list[MemlintError] = field(default_factory=list)
    files_checked: int = 0


def collect_files(paths: Iterable[str], settings: Settings, root: Path) -> list[SourceFile]:
    """Expand paths to Python files; named files are analysed, directories only where configured."""
    files: list[SourceFile] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise UsageError(f"{raw}: no such file or directory", hint="check the path")
        if path.is_dir():
            for folder, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
                for name in sorted(names):
                    if name.endswith((".py", ".pyi")):
                        file = Path(folder) / name
                        files.append(SourceFile(file, _display(file, root),
                                                analyse=_configured_model(file, settings, root)))
        else:
            files.append(SourceFile(path, _display(path, root), analyse=True))
    return files


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _configured_model(path: Path, settings: Settings, root: Path) -> bool:
    display = _display(path, root)
    return any(fnmatch.fnmatch(display, pattern.split(":")[0]) for pattern in settings.models)


def read_source(file: SourceFile) -> Diagnostic | None:
    """Read a file as UTF-8 Python; a file that is not is reported as E902 instead of crashing."""
    try:
        data = file.path.read_bytes()
    except OSError as exc:
        return _io_error(file, f"cannot read the file: {exc.strerror}")
    if b"\0" in data[:8192]:
        return _io_error(file, "is not a Python source file (it contains NUL bytes)")
    try:
        file.text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return _io_error(file, f"is not valid UTF-8 (byte {exc.start}); memlint reads Python sources as UTF-8 "
                               "(PEP 3120)")
    return None


def _io_error(file: SourceFile, message: str, line: int = 1, column: int = 1) -> Diagnostic:
    file.analyse = False
    return Diagnostic(file.display, line, column, "E902", Severity.ERROR, message)


def selected_rules(settings: Settings, *, model_rules: bool) -> list[type[Rule]]:
    return [rule for rule in all_rules()
            if code_matches(rule.code, settings.select) and not code_matches(rule.code, settings.ignore)
            and (model_rules or not rule.needs_model)]


def run_check(paths: list[str], settings: Settings, root: Path, *, debug: bool = False) -> CheckResult:
    result = CheckResult()
    targets = [resolve_target(spec, settings.user_targets) for spec in settings.targets]
    files = collect_files(paths, settings, root)
    rules = selected_rules(settings, model_rules=not settings.no_import)
    contexts: dict[str, RuleContext] = {}
    for file in files:
        problem = read_source(file)
        if problem is not None:
            result.diagnostics.append(problem)
            continue
        ctx = RuleContext(path=file.display, source=file.text, settings=settings, target=targets[0])
        try:
            ctx.wrapper
        except Exception as exc:  # libcst.ParserSyntaxError and its relatives
            result.diagnostics.append(_syntax_error(file, exc))
            continue
        contexts[file.display] = ctx
        result.diagnostics.extend(_apply(rules, ctx, needs_model=False))
    result.files_checked = len(files)
    to_analyse = [file for file in files if file.analyse and file.display in contexts and not settings.no_import]
    for file, target, answer in _analyse_all(to_analyse, targets, settings, contexts, debug):
        if answer.error:
            result.errors.append(error_from_json(answer.error))
        for data in answer.reports:
            report = ModelReport.from_json(data)
            result.reports.append(report)
            base = contexts[file.display]
            ctx = RuleContext(path=file.display, source=file.text, settings=settings, target=target, model=report,
                              extras=dict(base.extras))
            ctx.__dict__["wrapper"] = base.wrapper
            result.diagnostics.extend(_apply(rules, ctx, needs_model=True))
    result.diagnostics = sorted(set(result.diagnostics), key=Diagnostic.sort_key)
    return result


def _syntax_error(file: SourceFile, exc: Exception) -> Diagnostic:
    line = getattr(exc, "raw_line", None) or getattr(exc, "lineno", None) or 1
    column = (getattr(exc, "raw_column", None) or 0) + 1
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid syntax"
    file.analyse = False
    return Diagnostic(file.display, int(line), int(column), "E999", Severity.ERROR, f"syntax error: {message}")


def _apply(rules: list[type[Rule]], ctx: RuleContext, *, needs_model: bool) -> list[Diagnostic]:
    found = []
    ignored = [codes for pattern, codes in ctx.settings.per_file_ignores.items() if fnmatch.fnmatch(ctx.path, pattern)]
    for rule in rules:
        if rule.needs_model != needs_model or any(code_matches(rule.code, codes) for codes in ignored):
            continue
        for diagnostic in rule().check(ctx):
            if not is_suppressed(diagnostic, ctx.lines):
                found.append(diagnostic)
    return found


def _batch_size_for(settings: Settings, ctx: RuleContext) -> tuple[int, str | None]:
    """The flag or config wins; else the literal found in the code; else the documented default."""
    site: BatchSizeSite | None = find_batch_size(ctx.wrapper)
    ctx.extras["batch_size_site"] = site
    if settings.batch_size is not None:
        same = site is not None and site.value == settings.batch_size
        return settings.batch_size, f"{ctx.path}:{site.line}" if same and site else None
    if site is not None:
        return site.value, f"{ctx.path}:{site.line}"
    return DEFAULT_BATCH_SIZE, None


def _analyse_all(files: list[SourceFile], targets: list[Target], settings: Settings,
                 contexts: dict[str, RuleContext], debug: bool):
    jobs = []
    for file in files:
        batch_size, source = _batch_size_for(settings, contexts[file.display])
        for spec, target in zip(settings.targets, targets):
            jobs.append((file, target, AnalysisRequest(
                path=str(file.path), display_path=file.display, target=spec, settings=asdict(settings),
                batch_size=batch_size, batch_size_source=source, debug=debug)))
    memory_limit = _memory_limit(settings)
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        answers = pool.map(lambda job: run_in_child(job[2], settings.timeout, memory_limit), jobs)
        for (file, target, _), answer in zip(jobs, answers):
            yield file, target, answer


def _memory_limit(settings: Settings) -> int | None:
    if settings.memory_limit in (None, ""):
        return DEFAULT_MEMORY_LIMIT
    if settings.memory_limit == "none":
        return None
    return parse_bytes(settings.memory_limit)
