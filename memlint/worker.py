"""Analyse one model file in a child process, with a time limit and a memory limit.

Importing a model file runs the user's code: a hang, an infinite allocation or a crash
there must not take memlint (or the pre-commit hook, or CI) down with it. The parent sends
a JSON request on stdin and reads a JSON answer on stdout; the child never writes
bytecode into the user's tree.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from memlint.errors import MemlintError, ModelError
from memlint.settings import Settings

DEFAULT_MEMORY_LIMIT = 8 * 2**30


@dataclass
class AnalysisRequest:
    path: str
    display_path: str
    target: str
    settings: dict[str, Any]
    batch_size: int
    batch_size_source: str | None
    debug: bool = False


@dataclass
class AnalysisAnswer:
    """Reports for the models of one file, or the error that stopped the analysis."""

    reports: list[dict[str, Any]]
    error: dict[str, Any] | None = None


def run_in_child(request: AnalysisRequest, timeout: float, memory_limit: int | None) -> AnalysisAnswer:
    """Run the analysis in ``python -m memlint.worker``; translate timeouts and crashes."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    if memory_limit:
        env["MEMLINT_MEMORY_LIMIT"] = str(memory_limit)
    try:
        done = subprocess.run([sys.executable, "-m", "memlint.worker"], input=json.dumps(asdict(request)),
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return AnalysisAnswer([], _error_json(ModelError(
            f"the analysis did not finish within {timeout:g} s and was stopped", path=request.display_path,
            hint="a forward() that never returns, or a very large model: raise --timeout if it is the latter")))
    if done.returncode != 0 or not done.stdout.strip():
        reason = "ran out of its memory limit" if done.returncode in (-9, 137) or "MemoryError" in done.stderr \
            else f"crashed (exit code {done.returncode})"
        tail = done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else []
        return AnalysisAnswer([], _error_json(ModelError(
            f"the analysis {reason}{': ' + tail[0] if tail else ''}", path=request.display_path,
            hint="rerun with --debug to see the child's output")))
    return AnalysisAnswer(**json.loads(done.stdout.strip().splitlines()[-1]))


def _error_json(error: MemlintError) -> dict[str, Any]:
    return {"kind": type(error).__name__, "message": error.message, "path": error.path, "line": error.line,
            "hint": error.hint}


def error_from_json(data: dict[str, Any]) -> MemlintError:
    return ModelError(data["message"], path=data.get("path"), line=data.get("line"), hint=data.get("hint", ""))


def _limit_memory() -> None:
    limit = os.environ.get("MEMLINT_MEMORY_LIMIT")
    if limit:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (int(limit), int(limit)))


def analyse_request(request: AnalysisRequest) -> AnalysisAnswer:
    """In the child: import the file, find its models and analyse each one."""
    from memlint.estimator import Workload, analyse
    from memlint.loader import find_models, import_user_file
    from memlint.targets import resolve_target

    settings = Settings(**_settings_from_json(request.settings))
    target = resolve_target(request.target, settings.user_targets)
    path = Path(request.path)
    module = import_user_file(path)
    reports = []
    for entry in find_models(module, path, settings.model):
        workload = Workload(
            name=entry.name, path=request.display_path, line=entry.line, build=entry.build,
            example_inputs=entry.example_inputs, loss_fn=entry.loss_fn, build_optimizer=entry.build_optimizer,
            batch_size=request.batch_size, input_shape=settings.input_shape, input_dtype=settings.input_dtype,
            optimizer=settings.optimizer, precision=settings.precision, mode=settings.mode)
        report = analyse(workload, target, settings.threshold, settings.depth)
        report.batch_size_source = request.batch_size_source
        reports.append(report.to_json(full=True))
    return AnalysisAnswer(reports)


def _settings_from_json(data: dict[str, Any]) -> dict[str, Any]:
    tuples = ("targets", "select", "ignore", "models", "input_shape")
    return {k: tuple(v) if k in tuples and v is not None else v for k, v in data.items()}


def main() -> None:
    request = AnalysisRequest(**json.loads(sys.stdin.read()))
    sys.dont_write_bytecode = True
    _limit_memory()
    try:
        answer = analyse_request(request)
    except MemlintError as exc:
        if request.debug:
            traceback.print_exc()
        answer = AnalysisAnswer([], _error_json(exc))
    except MemoryError:
        answer = AnalysisAnswer([], _error_json(ModelError(
            "the analysis ran out of its memory limit", path=request.display_path,
            hint="the model file allocates real memory at import or construction; memlint itself builds on "
                 "fake tensors. Raise the limit with --memory-limit")))
    except Exception as exc:  # an internal error: say so plainly, with the traceback under --debug
        if request.debug:
            traceback.print_exc()
        answer = AnalysisAnswer([], _error_json(ModelError(
            f"internal error while analysing: {type(exc).__name__}: {exc}", path=request.display_path,
            hint="rerun with --debug and report it")))
    sys.stdout.write("\n" + json.dumps(asdict(answer)) + "\n")


if __name__ == "__main__":
    main()
