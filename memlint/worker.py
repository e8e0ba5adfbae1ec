"""Analyse one model file in a child process, with a time limit and a memory limit.

Importing a model file runs the user's code: a hang, an infinite allocation, a crash, an
``os._exit`` or garbage on stdout there must not take memlint (or the pre-commit hook, or CI)
down with it, and must be reported clearly. The parent sends a JSON request on stdin and reads
JSON lines (phase notes, then the answer) from a private copy of the child's stdout; the child
runs in its own process group (killed on a timeout and after it answers: no orphans), under
``RLIMIT_AS``, and never writes bytecode into the user's tree. See README, *Safety*. Where a warm
analysis server runs (memlint.server), the same ``main`` runs in a process forked from it.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterator

from memlint.cache import InputRecorder
from memlint.errors import MemlintError, ModelError
from memlint.settings import Settings

if TYPE_CHECKING:
    from memlint.server import ServedWorker

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
    inputs: dict[str, Any] | None = None  # what the analysis read (memlint.cache), when it may be kept


def run_in_child(request: AnalysisRequest, timeout: float, memory_limit: int | None) -> AnalysisAnswer:
    """Run the analysis in ``python -m memlint.worker``; translate timeouts, crashes and garbage.

    The child is the leader of a new process group, so that on a timeout (and after it
    exits) everything the user's code started is killed with it: no orphan processes. Its
    answer comes on stdout, which the child keeps to itself (the user's ``print`` goes to
    stderr, see ``main``); stderr goes to a temporary file (outside the analysed tree), so a
    grandchild that keeps it open cannot block us.
    """
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "MEMLINT_PARENT_PID": str(os.getpid()),
           "MEMLINT_DEADLINE": str(time.time() + STARTUP_LIMIT + timeout + _DEADLINE_GRACE)}
    env.pop("MEMLINT_MEMORY_LIMIT", None)
    if memory_limit:
        env["MEMLINT_MEMORY_LIMIT"] = str(memory_limit)
    with tempfile.TemporaryFile() as stderr:
        try:
            worker = _start_worker(env, stderr)
        except OSError as exc:
            return AnalysisAnswer([], _error_json(ModelError(
                f"could not start the analysis process: {exc.strerror or exc}", path=request.display_path,
                hint="check that the Python running memlint can start processes")))
        with _LIVE_LOCK:
            _LIVE_GROUPS.add(worker.group)
        if request.debug and not isinstance(worker, SpawnedWorker):
            sys.stderr.write(f"memlint: {request.display_path} on {request.target}: analysed in a worker forked by the "
                             f"analysis server (memlint server status; MEMLINT_NO_SERVER=1 spawns one instead)\n")
        try:
            output, timed_out = _talk(worker, json.dumps(asdict(request)).encode(), timeout)
        finally:
            worker.kill_group()
            returncode = worker.reap()
            with _LIVE_LOCK:
                _LIVE_GROUPS.discard(worker.group)
        stderr.seek(0)
        err = stderr.read().decode("utf-8", "replace")
    if request.debug and err.strip():
        sys.stderr.write(f"--- output of the analysis process for {request.display_path} ---\n{err}")
    return _answer(request, returncode, output, err, timed_out, timeout, memory_limit)


def _start_worker(env: dict[str, str], stderr: IO[bytes]) -> "SpawnedWorker | ServedWorker":
    """A worker forked by this environment's warm server (memlint.server) when one runs, else a new process."""
    from memlint.server import served_worker

    return served_worker(env, stderr) or SpawnedWorker(subprocess.Popen(
        [sys.executable, "-m", "memlint.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
        env=env, start_new_session=True))


class SpawnedWorker:
    """``python -m memlint.worker``, our child and the leader of its own process group."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.group = process.pid
        self.stdin, self.stdout = process.stdin, process.stdout

    def exited(self) -> bool:
        """Whether it has exited, without reaping it: its pid, the group id, stays ours until ``reap``."""
        waitid = getattr(os, "waitid", None)
        if waitid is None:
            return self.process.poll() is not None
        try:
            return waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def interrupt(self) -> None:
        try:
            self.process.send_signal(signal.SIGTERM)
        except OSError:
            pass

    def kill_group(self) -> None:
        if self.process.returncode is not None:
            return  # reaped: the group id may belong to someone else now
        try:
            os.killpg(self.group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self) -> int:
        return self.process.wait()


_DEADLINE_GRACE = 10.0  # the child stops itself this long after the parent's timeout, should the parent be gone
# The timeout counts from the moment the child starts on the user's file: memlint's own start
# (importing torch: seconds, more on a loaded machine) is not the model's time. It has its own limit.
STARTUP_LIMIT = 120.0
_LIVE_GROUPS: set[int] = set()  # process groups of running analyses, killed on Ctrl-C (kill_all_children)
_LIVE_LOCK = threading.Lock()


def _talk(worker: "SpawnedWorker | ServedWorker", request: bytes, timeout: float) -> tuple[bytes, bool]:
    """Send the request, collect stdout, and wait for the worker (not for what it left behind).

    ``timeout`` runs from the worker's first phase note (it has started on the user's file). On
    a timeout the worker first gets SIGTERM, on which it dumps its Python stack to stderr
    (faulthandler) so that the message can name the line it was stuck on; then the whole
    group gets SIGKILL.
    """
    chunks: list[bytes] = []
    started: list[float] = []

    def pump() -> None:
        try:
            worker.stdin.write(request)  # type: ignore[union-attr]
            worker.stdin.close()  # type: ignore[union-attr]
        except OSError:  # the worker died before reading its request: its exit status says why
            pass
        while True:
            chunk = worker.stdout.read1(1 << 16)  # type: ignore[union-attr]
            if not chunk:
                break
            if not started and b'"phase"' in chunk:
                started.append(time.monotonic())
            chunks.append(chunk)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    launched = time.monotonic()
    timed_out = not _wait_for_exit(worker, lambda: started[0] + timeout if started
                                   else launched + STARTUP_LIMIT + timeout)
    if timed_out:
        worker.interrupt()
        stop = time.monotonic() + 2.0
        _wait_for_exit(worker, lambda: stop)
    worker.kill_group()  # the worker's leftovers (and the worker, on a timeout)
    reader.join(5.0)
    worker.stdout.close()  # type: ignore[union-attr]
    return b"".join(chunks), timed_out


def _wait_for_exit(worker: "SpawnedWorker | ServedWorker", deadline: Callable[[], float]) -> bool:
    """Wait until the worker exits; False on timeout."""
    while not worker.exited():
        if time.monotonic() >= deadline():
            return False
        time.sleep(0.02)
    return True


def kill_all_children() -> None:
    """Stop every running analysis with its process group (on Ctrl-C or when memlint is stopped)."""
    with _LIVE_LOCK:
        groups = list(_LIVE_GROUPS)
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


_PHASES = {
    "import": ("importing the file", "the file runs code at import that does not return (a training loop, a "
               "download, input()?): guard it with `if __name__ == \"__main__\":`, or lint without importing: "
               "--no-import"),
    "analyse": ("building, tracing and simulating the model",
                "a forward() that never returns, or a model too large to simulate in time: raise --timeout "
                "if it is the latter"),
}


def _answer(request: AnalysisRequest, returncode: int, output: bytes, err: str, timed_out: bool, timeout: float,
            memory_limit: int | None) -> AnalysisAnswer:
    """The child's answer, or a one-paragraph error that says what happened to it."""
    messages: list[dict[str, Any]] = []
    for line in output.decode("utf-8", "replace").splitlines():
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                messages.append(value)
    phase = next((m["phase"] for m in reversed(messages) if "phase" in m), None)
    where, line = _stuck_at(err, request.path)
    if timed_out:
        doing, hint = _PHASES.get(phase or "", ("starting the analysis", "raise --timeout"))
        return AnalysisAnswer([], _error_json(ModelError(
            f"the analysis did not finish within {timeout:g} s while {doing}"
            f"{f', in {where}()' if where else ''}; memlint stopped it (and every process it started)",
            path=request.display_path, line=line, hint=hint)))
    answer = next((m for m in reversed(messages) if "reports" in m), None)
    if returncode == 0 and answer is not None:
        try:
            return AnalysisAnswer(reports=list(answer["reports"]), error=answer.get("error"),
                                  inputs=answer.get("inputs"))
        except (TypeError, KeyError):
            pass
    if returncode == 0:
        reason = "ended without an answer memlint could read"
    elif returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        reason = f"was killed by signal {name}"
        if -returncode == signal.SIGKILL:
            reason += " (by the system's out-of-memory killer, most likely)"
    else:
        reason = f"exited with code {returncode}"
    if "MemoryError" in err or "can't allocate memory" in err:
        reason += "; it ran out of memory"
    doing = _PHASES.get(phase or "", ("starting",))[0]
    hint = ("the model file's code ends the process (os._exit(), sys.exit() in a thread, a crash in an extension) "
            "or corrupts its output; guard scripts with `if __name__ == \"__main__\":`, or use --no-import; "
            "rerun with --debug to see the process's output")
    return AnalysisAnswer([], _error_json(ModelError(
        f"the analysis process {reason} while {doing}, before it could answer", path=request.display_path,
        line=line, hint=hint)))


def _stuck_at(err: str, path: str) -> tuple[str | None, int | None]:
    """The innermost frame of the user's file in a faulthandler or Python traceback dump: (function, line)."""
    target = os.path.realpath(path)
    frames = re.findall(r'File "([^"]+)", line (\d+),? in (\S+)', err)
    # faulthandler lists the most recent call first, Python tracebacks last: look at both orders.
    dump = err.rfind("most recent call first")
    ordered = frames if dump >= 0 and dump > err.rfind("most recent call last") else list(reversed(frames))
    for filename, number, function in ordered:
        if os.path.realpath(filename) == target:
            return (None if function == "<module>" else function), int(number)
    return None, None


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
    prepare_analysis()
    from memlint.estimator import Workload, analyse
    from memlint.loader import find_models, import_user_file
    from memlint.targets import resolve_target

    settings = Settings(**_settings_from_json(request.settings))
    target = resolve_target(request.target, settings.user_targets)
    path = Path(request.path)
    _emit({"phase": "import"})
    module = import_user_file(path)
    settle_imports()
    _emit({"phase": "analyse"})
    reports = []
    for entry in find_models(module, path, settings.model):
        workload = Workload(
            name=entry.name, path=request.display_path, line=entry.line, build=entry.build,
            example_inputs=entry.example_inputs, loss_fn=entry.loss_fn, build_optimizer=entry.build_optimizer,
            batch_size=request.batch_size, input_shape=settings.input_shape, input_dtype=settings.input_dtype,
            optimizer=settings.optimizer, precision=settings.precision, mode=settings.mode,
            strategy=settings.strategy, devices=settings.devices, checkpoint_layers=settings.checkpoint_layers,
            epoch_size=settings.epoch_size)
        report = analyse(workload, target, settings.threshold, settings.depth)
        report.batch_size_source = request.batch_size_source
        reports.append(report.to_json(full=True))
    return AnalysisAnswer(reports)


def prepare_analysis() -> None:
    """Import what every analysis needs (torch, torch._dynamo, memlint's engine), before any clock starts.

    The worker does it first; the warm server (memlint.server) does it once, for all its forks.
    """
    with _collector_paused():  # torch's import makes half a million objects, none of them garbage
        import memlint.estimator  # noqa: F401
        import memlint.loader  # noqa: F401
        import memlint.targets  # noqa: F401
        from memlint.fakemode import new_fake_mode

        new_fake_mode()  # memlint's own lazy imports (torch._dynamo, ...)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Import without the cyclic garbage collector (a fifth of torch's import time), then settle."""
    gc.disable()
    try:
        yield
    finally:
        settle_imports()
        gc.enable()


def settle_imports() -> None:
    """Move every object alive now out of the garbage collector's sight, for the rest of the process.

    Modules, classes and functions live until the process ends, yet every full collection
    walks them all: after torch and torchvision, 330,000 objects and 0.2 s of a ResNet-50
    analysis (``gc.freeze``: they are simply never scanned again).
    """
    gc.freeze()


def _settings_from_json(data: dict[str, Any]) -> dict[str, Any]:
    tuples = ("targets", "select", "ignore", "models", "input_shape")
    return {k: tuple(v) if k in tuples and v is not None else v for k, v in data.items()}


_ANSWER: Any = None  # the child's private channel to the parent (its original stdout)


_PHASE: list[str] = []  # the phases the child has entered (empty: memlint is still starting)


def _emit(message: dict[str, Any]) -> None:
    """Send one JSON line to the parent (a phase note or the answer)."""
    if "phase" in message:
        _PHASE.append(message["phase"])
    if _ANSWER is not None:
        _ANSWER.write(json.dumps(message) + "\n")
        _ANSWER.flush()


def _guard_child() -> None:
    """In the child: keep stdout for the answer, dump the stack on SIGTERM, and never outlive the parent.

    The user's code may print anything: fd 1 is pointed at stderr, and the answer goes to a
    private copy of the original stdout (not inherited by processes the user's code starts).
    On SIGTERM (the parent's timeout) faulthandler writes the Python stack to stderr, which
    names the line the model was stuck on, and the process ends. A watchdog thread kills the
    process group when the parent is gone or the deadline has passed (should the parent have
    been killed before it could do so).
    """
    global _ANSWER
    import faulthandler

    sys.stdout.flush()
    _ANSWER = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    faulthandler.enable(file=sys.__stderr__, all_threads=True)  # a crash (SIGSEGV, ...) names its line
    faulthandler.register(signal.SIGTERM, file=sys.__stderr__, all_threads=True, chain=True)
    real_exit = os._exit

    def exit_with_stack(code: int) -> None:  # os._exit() in the user's code: say where
        traceback.print_stack(sys._getframe(1), file=sys.__stderr__)
        sys.__stderr__.flush()
        real_exit(code)

    os._exit = exit_with_stack  # type: ignore[assignment]
    parent = int(os.environ.get("MEMLINT_PARENT_PID", "0") or 0)
    deadline = float(os.environ.get("MEMLINT_DEADLINE", "0") or 0)

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if (parent and os.getppid() != parent) or (deadline and time.time() > deadline):
                try:
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                finally:
                    os._exit(137)

    threading.Thread(target=watch, name="memlint-watchdog", daemon=True).start()


def main(after_answer: Callable[[], None] | None = None) -> None:
    """The worker: read the request on stdin, answer on the private channel, exit.

    ``after_answer`` runs once a successful answer is sent (the warm server's note of imports).
    """
    _guard_child()
    recorder = InputRecorder()
    recorder.install()
    request = AnalysisRequest(**json.loads(sys.stdin.read()))
    sys.dont_write_bytecode = True
    _limit_memory()
    try:
        answer = analyse_request(request)
    except MemlintError as exc:
        if request.debug:  # the user's own traceback first (the error hides it: `raise ... from None`)
            if exc.__context__ is not None and exc.__suppress_context__:
                traceback.print_exception(exc.__context__)
            traceback.print_exc()
        answer = AnalysisAnswer([], _error_json(exc))
    except MemoryError:
        answer = AnalysisAnswer([], _error_json(_out_of_memory(request.display_path, "while analysing")))
    except Exception as exc:  # an internal error: say so plainly, with the traceback under --debug
        if request.debug:
            traceback.print_exc()
        limit = os.environ.get("MEMLINT_MEMORY_LIMIT")
        if not _PHASE and limit and (_is_allocation_failure(exc) or "failed to map" in str(exc)):
            answer = AnalysisAnswer([], _error_json(ModelError(
                f"the memory limit ({_size(int(limit))}) is too small for memlint itself to start "
                f"({type(exc).__name__}: {exc})", path=request.display_path,
                hint="torch alone needs about 1 GiB of address space: raise --memory-limit (default 8GiB)")))
        elif _is_allocation_failure(exc):
            answer = AnalysisAnswer([], _error_json(_out_of_memory(request.display_path, "while analysing")))
        else:
            answer = AnalysisAnswer([], _error_json(ModelError(
                f"internal error while analysing: {type(exc).__name__}: {exc}", path=request.display_path,
                hint="rerun with --debug and report it")))
    if answer.error is None:
        answer.inputs = recorder.inputs()
    _emit(asdict(answer))
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the user's code may have closed it
            pass
    if after_answer is not None and answer.error is None:
        with contextlib.suppress(Exception):
            after_answer()
    # Leave at once: the user's atexit handlers and non-daemon threads have no business running now.
    _real_exit(0)


_real_exit = os._exit


def _size(nbytes: int) -> str:
    from memlint.units import format_bytes

    text = format_bytes(nbytes)
    return text.replace(".00 ", " ").replace(".0 ", " ")


def _is_allocation_failure(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "bad_alloc" in str(exc)


def _out_of_memory(path: str, when: str, line: int | None = None) -> ModelError:
    limit = os.environ.get("MEMLINT_MEMORY_LIMIT")
    size = _size(int(limit)) if limit else "the machine's memory"
    return ModelError(f"the model file allocated more real memory than the analysis may use ({size}) {when}",
                      path=path, line=line,
                      hint="memlint builds models on fake tensors and needs little memory itself, so the file's own "
                           "code allocates it (a large tensor or array at import or in the constructor); create it "
                           "lazily, or raise the limit with --memory-limit (or lint without importing: --no-import)")


if __name__ == "__main__":
    main()
