"""Run a check: find files, lint them statically, analyse their models in child processes, apply rules.

The static part never imports torch or the user's code; model analysis happens only for
the files named on the command line or listed under ``models`` in ``[tool.memlint]``, and
only without ``--no-import``.
"""
from __future__ import annotations

import ast
import fnmatch
import io
import os
import sys
import threading
import tokenize
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from memlint.batchsize import BatchSizeSite, find_batch_size
from memlint.cache import AnalysisCache, enabled as cache_enabled
from memlint.diagnostics import Diagnostic, Severity, code_matches, is_suppressed
from memlint.errors import MemlintError, UsageError
from memlint.modelscan import defines_model
from memlint.report import ModelReport
from memlint.rules.base import Rule, RuleContext, all_rules
from memlint.settings import Settings
from memlint.targets import Target, resolve_target
from memlint.units import parse_bytes
from memlint.worker import DEFAULT_MEMORY_LIMIT, AnalysisAnswer, AnalysisRequest, error_from_json, \
    kill_all_children, run_in_child

DEFAULT_BATCH_SIZE = 32
PYTHON_SUFFIXES = (".py", ".pyi", ".pyw")
SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".tox", ".nox", "node_modules", "build",
             "dist", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".eggs"}


@dataclass
class SourceFile:
    """A file to lint: its path as the user sees it, its text, and whether to analyse its models."""

    path: Path
    display: str
    text: str = ""
    analyse: bool = False
    model: str | None = None  # the model to analyse, from a `models` entry "path:Name"
    candidate: bool = False  # named, not configured: analysed when it defines a model (memlint.modelscan)


@dataclass
class CheckResult:
    diagnostics: list[Diagnostic] = field(default_factory=list)
    reports: list[ModelReport] = field(default_factory=list)
    errors: list[MemlintError] = field(default_factory=list)
    files_checked: int = 0
    files: list[str] = field(default_factory=list)  # display paths of the files checked
    root: str = ""  # the folder display paths are relative to


def collect_files(paths: Iterable[str], settings: Settings, root: Path) -> list[SourceFile]:
    """Expand paths to Python files and decide which to analyse (import and simulate).

    Files matching a ``models`` pattern are analysed, named or found in a directory. A named
    file that matches none is a candidate: analysed when it defines a model (checked statically
    in run_check), unless ``models`` is configured, which then lists the model files (``--model``
    still makes named files candidates). So a pre-commit hook, which names every changed file,
    imports only model files.
    """
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
                        configured = _configured_model(file, settings, root)
                        files.append(SourceFile(file, _display(file, root), analyse=configured is not None,
                                                model=configured or None))
        else:
            configured = _configured_model(path, settings, root)
            files.append(SourceFile(path, _display(path, root), analyse=configured is not None,
                                    model=configured or None,
                                    candidate=configured is None and (not settings.models or bool(settings.model))))
    return files


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _configured_model(path: Path, settings: Settings, root: Path) -> str | None:
    """None when no ``models`` pattern matches; else the model named by ``"path:Name"`` ("" for all)."""
    display = _display(path, root)
    for pattern in settings.models:
        glob, _, name = pattern.partition(":")
        if fnmatch.fnmatch(display, glob) or fnmatch.fnmatch(display, glob.removeprefix("./")):
            return name.strip()
    return None


def read_source(file: SourceFile) -> Diagnostic | None:
    """Read a file as UTF-8 Python; a file that is not is reported as E902 instead of crashing.

    A file named with another extension (``notes.txt``) is not read at all; one without an
    extension is read as a script.
    """
    if file.path.suffix and file.path.suffix.lower() not in PYTHON_SUFFIXES:
        return _io_error(file, f"is not a Python file ({file.path.suffix}): memlint lints Python sources "
                               f"({', '.join(PYTHON_SUFFIXES)}) and scripts without an extension")
    try:
        data = file.path.read_bytes()
    except OSError as exc:
        return _io_error(file, f"cannot read the file: {exc.strerror}")
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        return _io_error(file, "is not a Python source file: it contains NUL bytes (a binary file?)", line)
    try:  # UTF-8 (PEP 3120), or the encoding its `# -*- coding: ... -*-` line declares (PEP 263)
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as exc:  # an unknown declared encoding, or bytes that are not UTF-8 in the first lines
        if "unknown encoding" in str(exc):
            return _io_error(file, f"cannot be read: {exc.msg}; declare an encoding Python knows, or save it as UTF-8")
        encoding = "utf-8"
    try:
        file.text = data.decode(encoding)
    except (UnicodeDecodeError, LookupError) as exc:
        start = getattr(exc, "start", 0)
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        return _io_error(file, f"is not valid {encoding} (byte 0x{data[start]:02x} at offset {start}); save it as "
                               "UTF-8, or declare its encoding in a `# -*- coding: ... -*-` line (PEP 263)",
                         line, column)
    return None


def _io_error(file: SourceFile, message: str, line: int = 1, column: int = 1) -> Diagnostic:
    file.analyse = False
    return Diagnostic(file.display, line, column, "E902", Severity.ERROR, message)


def selected_rules(settings: Settings, *, model_rules: bool) -> list[type[Rule]]:
    return [rule for rule in all_rules()
            if code_matches(rule.code, settings.select) and not code_matches(rule.code, settings.ignore)
            and (model_rules or not rule.needs_model)]


def run_check(paths: list[str], settings: Settings, root: Path, *, debug: bool = False,
              changed_since: str | None = None, progress: "Callable[[str, int, int], None] | None" = None
              ) -> CheckResult:
    """Lint and analyse. ``changed_since``: only files changed since that git ref (memlint.gitdiff);
    ``progress(label, done, total)`` is called as model analyses start and finish."""
    result = CheckResult(root=str(root))
    targets = [resolve_target(spec, settings.user_targets) for spec in settings.targets]
    files = collect_files(paths, settings, root)
    if changed_since is not None:
        files = _only_changed(files, changed_since, settings, paths)
    result.files = [file.display for file in files]
    rules = selected_rules(settings, model_rules=not settings.no_import)
    contexts: dict[str, RuleContext] = {}
    provisional: dict[str, list[Diagnostic]] = {}  # static findings of `also_model` rules, per file
    static_only = [file for file in files if not file.analyse and not file.candidate]
    if len(static_only) >= PARALLEL_STATIC_MIN and (os.cpu_count() or 1) > 1:
        # Many files that are only linted (a directory): on every core; their findings are final.
        result.diagnostics.extend(_lint_in_parallel(static_only, settings, targets[0], rules))
        files_here = [file for file in files if file.analyse or file.candidate]
    else:
        files_here = files
    for file in files_here:
        found, later, ctx = lint_file(file, settings, targets[0], rules)
        result.diagnostics.extend(found)
        if ctx is not None:
            contexts[file.display] = ctx
            provisional[file.display] = later
    result.files_checked = len(files)
    to_analyse = [file for file in files if file.analyse and file.display in contexts and not settings.no_import]
    named = [file.display for file in files if file.candidate and file.display in contexts]  # named, parsed
    if settings.model and not to_analyse and not settings.no_import and named:
        # Asked for a model that no named file has: say so, rather than pass without analysing anything.
        result.errors.append(UsageError(
            f"--model {settings.model}: " + (f"the file does not define or import {settings.model}" if len(named) == 1
                                              else f"none of the files named ({', '.join(named[:3])}"
                                                   f"{', ...' if len(named) > 3 else ''}) defines or imports "
                                                   f"{settings.model}"),
            path=named[0] if len(named) == 1 else None,
            hint="name the file that defines it, or check the spelling"))
    for file, target, answer in _analyse_all(to_analyse, targets, settings, contexts, debug, progress):
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
            provisional.pop(file.display, None)  # judged again with the model: those findings replace these
    for found in provisional.values():
        result.diagnostics.extend(found)
    result.diagnostics = _once_per_run(sorted(set(result.diagnostics), key=Diagnostic.sort_key), rules)
    return result


def _once_per_run(diagnostics: list[Diagnostic], rules: list[type[Rule]]) -> list[Diagnostic]:
    """Keep the first of identical findings of ``once_per_run`` rules: they are about the run
    (a target, the configuration), and a rule sees one file at a time."""
    codes = {rule.code for rule in rules if rule.once_per_run}
    seen: set[tuple[str, str]] = set()
    kept = []
    for diagnostic in diagnostics:
        key = (diagnostic.code, diagnostic.message)
        if diagnostic.code in codes:
            if key in seen:
                continue
            seen.add(key)
        kept.append(diagnostic)
    return kept


PARALLEL_STATIC_MIN = 256  # from this many static-only files on, lint them on every core


def lint_file(file: SourceFile, settings: Settings, target: Target, rules: list[type[Rule]]
              ) -> tuple[list[Diagnostic], list[Diagnostic], RuleContext | None]:
    """The static rules on one file; never imports or runs it.

    Returns the findings, the provisional findings of ``also_model`` rules (replaced when the
    file's model is analysed) and the context, None when the file did not parse. A file that
    cannot be read as Python is an E902 finding, one that does not parse an E999 finding (exit
    code 1, as in ruff): they are problems in the user's files, not in the run.
    """
    problem = read_source(file)
    if problem is not None:
        return [problem], [], None
    ctx = RuleContext(path=file.display, source=file.text, settings=settings, target=target)
    try:
        ctx.wrapper
    except Exception as exc:  # libcst.ParserSyntaxError and its relatives
        return [_syntax_error(file, exc)], [], None
    # libcst does not decode string literals; CPython does, and rejects a truncated \u escape, an unknown
    # \N{name} or a non-ASCII byte in a bytes literal. Only a file with a backslash or a non-ASCII
    # character can hold one (344 of transformers' 501 modeling files: 4% of the static rules' time).
    if "\\" in file.text or not file.text.isascii():
        rejected = _rejected_by_cpython(file)
        if rejected is not None:
            file.analyse = False
            return [rejected], [], None
    if file.candidate:
        file.analyse = defines_model(ctx.module, settings.model)
    return (_apply([r for r in rules if not r.also_model], ctx, needs_model=False),
            _apply([r for r in rules if r.also_model], ctx, needs_model=False), ctx)


def _lint_chunk(job: tuple[list[SourceFile], Settings, Target, list[str]]) -> list[Diagnostic]:
    files, settings, target, codes = job
    rules = [rule for rule in all_rules() if rule.code in codes]
    found: list[Diagnostic] = []
    for file in files:
        final, provisional, _ = lint_file(file, settings, target, rules)
        found += final + provisional
    return found


def _lint_in_parallel(files: list[SourceFile], settings: Settings, target: Target,
                      rules: list[type[Rule]]) -> list[Diagnostic]:
    """Static rules over many files on every core (forked workers: nothing is imported again)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    codes = [rule.code for rule in rules]
    if "fork" not in multiprocessing.get_all_start_methods():
        return _lint_chunk((files, settings, target, codes))
    workers = min(os.cpu_count() or 1, 8)
    size = max(16, -(-len(files) // (workers * 4)))
    jobs = [(files[i:i + size], settings, target, codes) for i in range(0, len(files), size)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return [diagnostic for chunk in pool.map(_lint_chunk, jobs) for diagnostic in chunk]


def _syntax_error(file: SourceFile, exc: Exception) -> Diagnostic:
    """E999 where libcst does not parse the file: CPython's error, or libcst's where CPython accepts it."""
    file.analyse = False
    rejected = _rejected_by_cpython(file)
    if rejected is not None:
        return rejected
    # CPython accepts it and libcst does not (a newer syntax): say so, with libcst's reason
    line = getattr(exc, "raw_line", None) or getattr(exc, "lineno", None) or 1
    column = (getattr(exc, "raw_column", None) or 0) + 1
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid syntax"
    return Diagnostic(file.display, int(line), max(1, int(column)), "E999", Severity.ERROR,
                      f"syntax error: {reason} (memlint's parser, libcst, does not support this syntax)")


def _rejected_by_cpython(file: SourceFile) -> Diagnostic | None:
    """E999 where CPython does not parse the file, with its message (``compile`` to an AST only parses,
    it runs nothing); else None."""
    try:
        compile(file.text, file.display, "exec", flags=ast.PyCF_ONLY_AST, dont_inherit=True)
    except SyntaxError as error:
        line, column = error.lineno or 1, error.offset or 1
        message = error.msg or "invalid syntax"
    except (ValueError, RecursionError, MemoryError) as error:  # e.g. nested too deeply to parse
        line, column, message = 1, 1, f"cannot be parsed ({type(error).__name__}: {error})"
    else:
        return None
    return Diagnostic(file.display, int(line), max(1, int(column)), "E999", Severity.ERROR,
                      f"syntax error: {message}")


def _apply(rules: list[type[Rule]], ctx: RuleContext, *, needs_model: bool) -> list[Diagnostic]:
    found = []
    ignored = [codes for pattern, codes in ctx.settings.per_file_ignores.items() if fnmatch.fnmatch(ctx.path, pattern)]
    for rule in rules:
        runs = (rule.needs_model or rule.also_model) if needs_model else not rule.needs_model
        if not runs or any(code_matches(rule.code, codes) for codes in ignored):
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
                 contexts: dict[str, RuleContext], debug: bool,
                 progress: "Callable[[str, int, int], None] | None" = None):
    jobs = []
    for file in files:
        batch_size, source = _batch_size_for(settings, contexts[file.display])
        file_settings = asdict(settings)
        if file.model:
            file_settings["model"] = file.model
        for spec, target in zip(settings.targets, targets):
            jobs.append((file, target, AnalysisRequest(
                path=str(file.path), display_path=file.display, target=spec, settings=file_settings,
                batch_size=batch_size, batch_size_source=source, debug=debug)))
    memory_limit = _memory_limit(settings)
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    done = [0]
    lock = threading.Lock()

    cache = AnalysisCache() if cache_enabled(settings.cache) else None

    def work(job):
        if progress is not None:
            with lock:
                progress(f"{job[0].display} on {job[2].target}", done[0], len(jobs))
        try:
            answer = _analyse_one(job[2], settings, memory_limit, cache)
        except Exception as exc:  # the parent must survive whatever happened to the child
            answer = AnalysisAnswer([], {"message": f"the analysis failed: {type(exc).__name__}: {exc}",
                                         "path": job[2].display_path, "line": None,
                                         "hint": "rerun with --debug and report it"})
        if progress is not None:
            with lock:
                done[0] += 1
                progress(f"{job[0].display} on {job[2].target}", done[0], len(jobs))
        return answer

    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            answers = pool.map(work, jobs)
            for (file, target, _), answer in zip(jobs, answers):
                yield file, target, answer
        except BaseException:  # Ctrl-C, or a failure while judging an answer: stop every child at once
            kill_all_children()
            raise


def _analyse_one(request: AnalysisRequest, settings: Settings, memory_limit: int | None,
                 cache: AnalysisCache | None) -> AnalysisAnswer:
    """The kept answer while the model's inputs are unchanged, else a fresh analysis (kept when it succeeds)."""
    fields = asdict(request)
    kept = cache.lookup(fields) if cache is not None else None
    if kept is not None:
        if request.debug:
            print(f"memlint: {request.display_path} on {request.target}: unchanged since its last analysis, "
                  f"answered from the cache in {cache.directory} (--no-cache analyses afresh)", file=sys.stderr)
        return AnalysisAnswer(reports=kept["reports"])
    answer = run_in_child(request, settings.timeout, memory_limit)
    if cache is not None and answer.error is None and answer.inputs is not None:
        cache.store(fields, {"reports": answer.reports}, answer.inputs)
    return answer


def _only_changed(files: list[SourceFile], base: str, settings: Settings, paths: list[str]) -> list[SourceFile]:
    """The files changed since ``base``; all configured models too when the configuration changed."""
    from memlint.gitdiff import changed_files

    start = Path(paths[0]) if paths else Path.cwd()
    changed = changed_files(base, start if start.exists() else Path.cwd())
    config_changed = bool(settings.config_path) and Path(settings.config_path).resolve() in changed
    return [file for file in files
            if file.path.resolve() in changed or (config_changed and file.analyse and not file.candidate)]


def _memory_limit(settings: Settings) -> int | None:
    if settings.memory_limit in (None, ""):
        return DEFAULT_MEMORY_LIMIT
    if settings.memory_limit == "none":
        return None
    return parse_bytes(settings.memory_limit)
