"""A warm analysis server: torch imported once, every analysis a fork of it (Linux only).

A cold analysis process spends seconds importing torch and ``torch._dynamo`` (which
FakeTensorMode and every optimizer step need) before it reads the user's file. With
``memlint server start``, one background process pays that once; ``memlint check`` then asks it
for each analysis, and it forks a fresh process that already holds those imports.

The forked process is the same worker as ``python -m memlint.worker`` (``memlint.worker.main``),
given the check's stdin, stdout and stderr (passed over a Unix socket), working directory,
environment and ``sys.path``. So the time limit, memory limit, crash reports, answer channel and
cache records are the worker's own. Between the server and each worker stands a small session
process: the leader of the worker's process group (so that memlint can kill the group, as it
does a spawned worker's), which tells the check when the worker exited and kills the group when
the check is done or gone.

A server belongs to one Python environment and one copy of memlint and torch: its socket is
named by a key of the interpreter, memlint's files, torch's version files and the ``TORCH*``
variables. A check whose key has no server, or ``MEMLINT_NO_SERVER=1``, spawns its worker as
before. The socket lives in a private folder (mode 0700) of the temporary directory. The server
stops after ``--idle-timeout`` seconds without a request, on ``memlint server stop``, or on
SIGTERM.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

from memlint.cache import file_stamp

DEFAULT_IDLE_TIMEOUT = 3600.0
_HEADER = struct.Struct("!I")  # length of the JSON request that follows the header (which carries the fds)
# Variables that change what the server's interpreter or torch's import did: a check whose values
# differ cannot use it.
_ENVIRONMENT_IN_KEY = ("TORCH", "PYTORCH", "PYTHONHOME", "PYTHONNOUSERSITE", "PYTHONSAFEPATH", "PYTHONUSERBASE")
# ...except one that torch sets itself once inductor has chosen its cache folder (a test run's
# commands inherit it), and that its import does not read.
_SET_BY_TORCH = ("TORCHINDUCTOR_CACHE_DIR",)


def available() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("MEMLINT_NO_SERVER", "") in ("", "0")


def folder() -> Path:
    return Path(tempfile.gettempdir()) / f"memlint-{os.getuid()}"


def _private_folder() -> Path | None:
    """The socket folder, created 0700; None when it exists but another user could reach into it."""
    path = folder()
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        status = path.lstat()
    except OSError:
        return None
    if status.st_uid != os.getuid() or status.st_mode & 0o077 or not path.is_dir() or path.is_symlink():
        return None
    return path


@functools.lru_cache(maxsize=1)
def server_key() -> str | None:
    """What a server must share with this process to analyse for it; None when torch is not installed.

    Computed once per process: a check asks for every file and target it analyses.
    """
    import memlint

    torch = importlib.util.find_spec("torch")
    rules = importlib.util.find_spec("memlint.rules")
    if torch is None or torch.origin is None or rules is None:
        return None
    package = Path(memlint.__file__).parent
    files = [*sorted(package.rglob("*.py")), *sorted(package.glob("data/*.toml")),
             *sorted(Path(next(iter(rules.submodule_search_locations or []), package)).glob("*.py")),
             Path(torch.origin), Path(torch.origin).with_name("version.py")]
    stamps = {str(path): file_stamp(str(path)) for path in files}
    identity = {"executable": sys.executable, "version": sys.version, "prefix": sys.prefix, "files": stamps,
                "environment": {k: v for k, v in os.environ.items()
                                if k.startswith(_ENVIRONMENT_IN_KEY) and k not in _SET_BY_TORCH}}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _connect(key: str, timeout: float = 2.0) -> socket.socket | None:
    private = _private_folder()
    if private is None:
        return None
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(timeout)
    try:
        client.connect(str(private / f"{key}.sock"))
    except OSError:
        client.close()
        return None
    return client


def _send(connection: socket.socket, message: dict[str, Any], fds: list[int] = ()) -> None:  # type: ignore[assignment]
    payload = json.dumps(message).encode()
    socket.send_fds(connection, [_HEADER.pack(len(payload))], list(fds))
    connection.sendall(payload)


def _receive(connection: socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    header, fds, _, _ = socket.recv_fds(connection, _HEADER.size, max_fds)
    while len(header) < _HEADER.size:
        more = connection.recv(_HEADER.size - len(header))
        if not more:
            raise ConnectionError("the request ended early")
        header += more
    (length,) = _HEADER.unpack(header)
    payload = b""
    while len(payload) < length:
        more = connection.recv(min(length - len(payload), 1 << 20))
        if not more:
            raise ConnectionError("the request ended early")
        payload += more
    return json.loads(payload), fds


def _read_line(connection: socket.socket, buffer: bytearray) -> dict[str, Any] | None:
    """One JSON line from the session (blocking); None when it has gone."""
    while b"\n" not in buffer:
        try:
            more = connection.recv(4096)
        except OSError:
            return None
        if not more:
            return None
        buffer += more
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return json.loads(line)


# ----------------------------------------------------------------------------------------------
# The check's side: a worker forked by the server, with what memlint.worker needs of a Popen.

class ServedWorker:
    """A worker forked by the server; ``memlint.worker`` drives it as it does a spawned one."""

    def __init__(self, connection: socket.socket, pid: int, group: int, stdin: BinaryIO, stdout: BinaryIO) -> None:
        self.connection = connection
        self.pid = pid
        self.group = group  # the session process's pid: alive, so the group id is ours, until we release it
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        self._buffer = bytearray()
        self._released = False

    def exited(self) -> bool:
        """Whether the worker has exited (the session says so, with its status)."""
        if self.returncode is None and select.select([self.connection], [], [], 0)[0]:
            message = _read_line(self.connection, self._buffer)
            # A session that is gone was killed: by the out-of-memory killer, or with its server.
            self.returncode = int(message["exit"]) if message else -signal.SIGKILL
        return self.returncode is not None

    def interrupt(self) -> None:
        """SIGTERM to the worker, on which it writes its stack (the session has not reaped it yet)."""
        if not self.exited():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except OSError:
                pass

    def kill_group(self) -> None:
        """Ask the session to kill the worker's group (with whatever the user's code started) and itself."""
        if self._released:
            return
        self._released = True
        try:
            self.connection.sendall(b"kill\n")
            self.connection.settimeout(5.0)
            while self.connection.recv(4096):  # until the session is gone
                pass
        except OSError:
            pass

    def reap(self) -> int:
        if self.returncode is None:
            self.returncode = -signal.SIGKILL  # killed with its group before it said how it exited
        self.connection.close()
        return self.returncode


def served_worker(environment: dict[str, str], stderr: BinaryIO) -> ServedWorker | None:
    """A worker forked by this environment's server, or None when no server answers (spawn one then)."""
    if not available():
        return None
    key = server_key()
    connection = _connect(key) if key else None
    if connection is None:
        return None
    stdin_read, stdin_write = os.pipe()
    stdout_read, stdout_write = os.pipe()
    try:
        _send(connection, {"op": "analyse", "cwd": os.getcwd(), "environment": environment},
              [stdin_read, stdout_write, stderr.fileno()])
        connection.settimeout(10.0)  # a server busy importing what it learned answers within seconds
        started = _read_line(connection, bytearray())
        connection.settimeout(None)
    except OSError:
        started = None
    finally:
        os.close(stdin_read)
        os.close(stdout_write)
    if not started or "pid" not in started:
        connection.close()
        os.close(stdin_write)
        os.close(stdout_read)
        return None
    return ServedWorker(connection, int(started["pid"]), int(started["group"]), os.fdopen(stdin_write, "wb"),
                        os.fdopen(stdout_read, "rb"))


def ask(op: str) -> dict[str, Any] | None:
    """A running server's answer to ``status`` or ``stop``; None when none runs for this environment."""
    key = server_key()
    connection = _connect(key) if key and sys.platform.startswith("linux") else None
    if connection is None:
        return None
    with connection:
        try:
            _send(connection, {"op": op})
            return _read_line(connection, bytearray())
        except OSError:
            return None


def start(idle_timeout: float, startup_limit: float) -> dict[str, Any]:
    """Start this environment's server in the background and wait until it is warm; its status."""
    from memlint.errors import UsageError

    if not sys.platform.startswith("linux"):
        raise UsageError("the analysis server runs on Linux only", hint="checks spawn a process per analysis")
    running = ask("status")
    if running:
        return {**running, "already": True}
    key, private = server_key(), _private_folder()
    if key is None:
        raise UsageError("the analysis server needs torch, which is not installed",
                         hint="pip install 'memlint[model]'")
    if private is None:
        raise UsageError(f"{folder()} cannot hold the server's socket (another user can reach into it)")
    with open(private / f"{key}.log", "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "memlint.server", "--idle-timeout", str(idle_timeout)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, cwd="/",
                                   start_new_session=True)
    assert process.stdout is not None
    ready = select.select([process.stdout], [], [], startup_limit)[0]
    line = process.stdout.readline() if ready else b""
    process.stdout.close()
    message = json.loads(line) if line.startswith(b"{") else {}
    if "pid" not in message:
        if process.poll() is None:
            process.kill()
        raise UsageError("the analysis server did not start" + (f": {message['error']}" if "error" in message else ""),
                         hint=f"its log is {private / f'{key}.log'}")
    return message


# ----------------------------------------------------------------------------------------------
# The server's side.

def serve(idle_timeout: float) -> int:
    """Run the server: warm up, answer requests until idle, stopped or terminated."""
    import fcntl

    key, private = server_key(), _private_folder()
    if key is None or private is None:
        return _ready({"error": "torch is not installed" if key is None else f"{folder()} is not private"})
    lock = open(private / f"{key}.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return _ready({"error": "another server for this environment is starting or running"})
    _remove_stopped_servers_files(private, key)
    from memlint.worker import prepare_analysis

    started = time.monotonic()
    prepare_analysis()
    learned = LearnedImports(private / f"{key}.imports")
    trouble = learned.update()
    if trouble:
        return _ready({"error": trouble})
    warm_up = time.monotonic() - started
    path = private / f"{key}.sock"
    path.unlink(missing_ok=True)  # a stale socket of a server that died: the lock says none runs
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    bound = path.stat().st_ino  # removed at the end only if no newer server has replaced it
    state = {"pid": os.getpid(), "key": key, "warm_up": round(warm_up, 2), "idle_timeout": idle_timeout,
             "started": time.time(), "analyses": 0, "learned": len(learned)}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _adopt_orphans()
    _ready(state)
    sessions: set[int] = set()
    last = time.monotonic()
    try:
        while True:
            _reap(sessions)
            if not select.select([listener], [], [], 1.0)[0]:
                if not sessions:
                    if time.monotonic() - last > idle_timeout:
                        return 0
                    trouble = learned.update()  # while idle: what the last analyses imported
                    if trouble:
                        print(f"memlint server: stopping: {trouble}", file=sys.stderr)
                        return 0
                    state["learned"] = len(learned)
                continue
            connection, _ = listener.accept()
            last = time.monotonic()
            changed = learned.changed()
            if changed:  # the check that asked spawns its own worker; the next `server start` imports afresh
                print(f"memlint server: stopping: {changed} changed since the server imported it", file=sys.stderr)
                connection.close()
                return 0
            if _handle(connection, listener, lock, state, sessions, learned.path) == "stop":
                return 0
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == bound:
                path.unlink()
        listener.close()


def _remove_stopped_servers_files(private: Path, key: str) -> None:
    """The lock, socket and log of servers of older memlint or torch files that no longer run."""
    import fcntl

    for lock_path in private.glob("*.lock"):
        if lock_path.stem == key:
            continue
        try:
            with open(lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while that server runs
                for suffix in (".sock", ".log", ".lock"):
                    lock_path.with_suffix(suffix).unlink(missing_ok=True)
        except OSError:
            continue


def _ready(message: dict[str, Any]) -> int:
    """Tell ``memlint server start`` how it went, then leave stdout (the starter stops reading)."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    return 0 if "pid" in message else 1


def _adopt_orphans() -> None:
    """Become the reaper of the sessions' orphans (a worker killed with its session), where init may not be."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _reap(sessions: set[int]) -> None:
    """Collect every exited child: sessions, and the orphans the server adopted."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if not pid:
            return
        sessions.discard(pid)


def _handle(connection: socket.socket, listener: socket.socket, lock: Any, state: dict[str, Any],
            sessions: set[int], imports_path: Path) -> str | None:
    with connection:
        connection.settimeout(5.0)
        try:
            request, fds = _receive(connection, max_fds=3)
        except (OSError, ValueError):
            return None
        op = request.get("op")
        if op != "analyse" or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            try:
                connection.sendall(json.dumps({**state, "stopping": op == "stop"}).encode() + b"\n")
            except OSError:
                pass
            return "stop" if op == "stop" else None
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:  # the check that asked spawns its own worker
            print(f"memlint server: could not fork: {exc}", file=sys.stderr)
            pid = -1
        if pid == 0:
            try:
                listener.close()
                lock.close()
                _session(connection, fds, request, imports_path)
            finally:
                os._exit(70)
        for fd in fds:
            os.close(fd)
        if pid > 0:
            state["analyses"] += 1
            sessions.add(pid)
    return None


def _session(connection: socket.socket, fds: list[int], request: dict[str, Any], imports_path: Path) -> None:
    """In the fork: lead a new process group, fork the worker into it, report its exit, kill the group."""
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    worker = os.fork()
    if worker == 0:
        connection.close()
        _become_worker(fds, request, imports_path)
    for fd in fds:
        os.close(fd)
    connection.settimeout(None)
    connection.sendall(json.dumps({"pid": worker, "group": os.getpid()}).encode() + b"\n")
    reported = False
    while True:
        if select.select([connection], [], [], None if reported else 0.02)[0]:
            # "kill" when the check is done, nothing when it is gone: either way the group goes.
            os.waitpid(worker, os.WNOHANG)  # reaped here if it has exited, else killed with the group
            os.killpg(0, signal.SIGKILL)
        if not reported:
            status = os.waitid(os.P_PID, worker, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if status is not None:  # left unreaped, so that its pid stays the worker's until the check is done
                code = status.si_status if status.si_code == os.CLD_EXITED else -status.si_status
                connection.sendall(json.dumps({"exit": code}).encode() + b"\n")
                reported = True


def _become_worker(fds: list[int], request: dict[str, Any], imports_path: Path) -> None:
    """In the session's fork: become ``python -m memlint.worker`` as the check would have started it."""
    for number, fd in enumerate(fds):
        os.dup2(fd, number)
        os.close(fd)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a new interpreter
    for number in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(number, signal.SIG_DFL)
    cwd, environment = request["cwd"], request["environment"]
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environment)
    os.environ["MEMLINT_PARENT_PID"] = str(os.getppid())  # the watchdog follows the session, which follows the check
    sys.path[:] = _worker_path(cwd, environment.get("PYTHONPATH", ""))
    import memlint.worker
    import random

    random.seed()
    sys.argv = [memlint.worker.__file__]
    server_modules = frozenset(sys.modules)
    memlint.worker.main(after_answer=lambda: LearnedImports(imports_path).note(server_modules, cwd))


class LearnedImports:
    """Installed modules that served analyses imported, imported by the server too, for the next forks.

    A worker notes, after its answer, the modules it imported that the server had not: only those
    of the interpreter's library and site-packages, never the user's code (their working directory,
    PYTHONPATH, an editable install's source). The server imports them while idle; BERT's check then
    finds transformers imported. It serves only while their files are unchanged (``changed``).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._read: int | None = None
        self._stamps: dict[str, list[int] | None] = {}
        # torch's import leaves numpy's OpenBLAS threads, which are fork-safe (they mind pthread_atfork)
        self._threads = _threads()

    def note(self, before: frozenset[str], cwd: str) -> None:
        """In a served worker: add what it imported to the list (written whole, or not at all)."""
        import sysconfig

        roots = tuple(os.path.join(sysconfig.get_paths()[name], "") for name in ("stdlib", "purelib", "platlib"))
        new = {name for name, module in list(sys.modules.items())
               if name not in before and isinstance(getattr(module, "__file__", None), str)
               and module.__file__.startswith(roots) and not module.__file__.startswith(os.path.join(cwd, ""))}
        if not new:
            return
        known = set(self._names())
        if new <= known:
            return
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, suffix=".tmp")
        with os.fdopen(handle, "w") as stream:
            json.dump(sorted(known | new), stream)
        os.replace(temporary, self.path)

    def update(self) -> str | None:
        """In the server: import what the list gained since last time; why forking is unsafe now, if it is."""
        import gc
        import importlib

        try:
            stamp = self.path.stat().st_mtime_ns
        except OSError:
            return None
        if stamp == self._read:
            return None
        self._read = stamp
        names = [name for name in self._names() if name not in sys.modules]
        gc.disable()
        try:
            for name in names:
                try:
                    importlib.import_module(name)
                except BaseException:  # noqa: BLE001 - the worker imports it again, and says what went wrong
                    continue
        finally:
            gc.freeze()
            gc.enable()
        for name in names:
            filename = getattr(sys.modules.get(name), "__file__", None)
            if isinstance(filename, str):
                self._stamps[filename] = file_stamp(filename)
        if _threads() > self._threads:  # a new thread, Python's or a library's own
            self.path.unlink(missing_ok=True)  # not again: a thread does not survive a fork
            return f"importing {', '.join(names[:3])}... started a thread, after which forking is not safe"
        return None

    def __len__(self) -> int:
        return len(self._stamps)

    def changed(self) -> str | None:
        """The first imported file that has changed since the server imported it (an upgrade), if any."""
        return next((path for path, stamp in self._stamps.items() if file_stamp(path) != stamp), None)

    def _names(self) -> list[str]:
        try:
            names = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return []
        return [name for name in names if isinstance(name, str)] if isinstance(names, list) else []


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


_OWN_PATH: list[str] = []  # the server's sys.path without its working directory and PYTHONPATH entries


def _worker_path(cwd: str, pythonpath: str) -> list[str]:
    """``sys.path`` as ``python -m memlint.worker`` would start with in ``cwd`` with ``PYTHONPATH``."""
    entries = [os.path.abspath(os.path.join(cwd, entry)) for entry in pythonpath.split(os.pathsep) if entry]
    return ([] if sys.flags.safe_path else [cwd]) + entries + _OWN_PATH


def _main() -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m memlint.server")
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT)
    args = parser.parse_args()
    own = {os.path.abspath(entry) for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry}
    _OWN_PATH[:] = [entry for entry in sys.path[0 if sys.flags.safe_path else 1:] if entry not in own]
    return serve(args.idle_timeout)


if __name__ == "__main__":
    raise SystemExit(_main())
