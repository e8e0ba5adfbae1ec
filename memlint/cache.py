"""Remember model analyses between runs, as ruff and mypy remember theirs.

Most commits do not touch the model, yet a pre-commit hook analyses it on each one: seconds of
``import torch`` and fake-tensor simulation for the answer it gave last time. An analysis is a
function of the request (file, target, settings) and of what the analysis process read: the
Python files of every module it imported (the user's, torch's, memlint's own), the files it
opened for reading, the folders it searched for modules or listed, and the environment
variables it looked up. The child records all of that (``InputRecorder``); the parent keeps the
answer with that record (``AnalysisCache``) and gives it back while every recorded file and
folder has the same size and modification time and every variable the same value. Checking
that takes a few thousand ``stat`` calls and no torch import.

Only answers without an error are kept: a timeout or running out of memory depends on the
machine's load, not only on the inputs. The cache lives outside the user's tree
(``$MEMLINT_CACHE_DIR``, else ``$XDG_CACHE_HOME/memlint``, else ``~/.cache/memlint``); a cache
that cannot be read or written is skipped silently. ``--no-cache``, ``cache = false`` or
``MEMLINT_NO_CACHE=1`` analyse afresh.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FORMAT = 1  # bump when the entry's layout or the answer's meaning changes
MAX_ENTRIES = 64  # least recently used entries beyond this are deleted (an entry is about 1 MB)
RACY_SECONDS = 2.0  # a file modified this close to the analysis may have changed after it was read
# Settings that bound the analysis without changing a successful answer.
_NOT_IN_KEY = ("timeout", "memory_limit", "config_path")
_IGNORED_ROOTS = ("/proc/", "/sys/", "/dev/")
# Variables read by torch's C++ side (invisible to the recorder) that could change an analysis.
_ENV_PREFIXES_IN_KEY = ("TORCH", "PYTORCH")
_SET_BY_MEMLINT = ("MEMLINT_", "PYTHONDONTWRITEBYTECODE")  # memlint.worker sets these for its child


def enabled(setting: bool) -> bool:
    return setting and os.environ.get("MEMLINT_NO_CACHE", "") in ("", "0")


def default_directory() -> Path:
    explicit = os.environ.get("MEMLINT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memlint"


class InputRecorder:
    """In the analysis process: note every file, folder and environment variable it reads.

    Files and folders come from ``sys.addaudithook`` (``open`` for reading, ``os.listdir``,
    ``os.scandir``) and, at the end, from the modules in ``sys.modules`` and the folders of
    ``sys.path`` (where a module that was not found would appear: a package installed later
    changes its folder). Environment variables come from a subclass of ``os.environ``'s class
    that notes each key looked up; those memlint sets for the child are not inputs. Code that
    walks the whole environment (tqdm does, for its ``TQDM_*`` defaults) is not followed: every
    variable would then be an input, and a hook's environment differs from run to run.
    """

    def __init__(self) -> None:
        self.started = time.time()
        self.paths: set[str] = set()
        self.variables: dict[str, str | None] = {}

    def install(self) -> None:
        sys.addaudithook(self._audit)
        recorder = self

        class RecordingEnviron(type(os.environ)):  # type: ignore[misc]
            def __getitem__(self, key: str) -> str:
                try:
                    value = super().__getitem__(key)
                except KeyError:
                    recorder._read(key, None)
                    raise
                recorder._read(key, value)
                return value

        os.environ.__class__ = RecordingEnviron

    def _read(self, key: str, value: str | None) -> None:
        if not key.startswith(_SET_BY_MEMLINT):
            self.variables.setdefault(key, value)

    def _audit(self, event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            if mode is None:
                reading = not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)
            else:
                reading = not any(letter in mode for letter in "wax+")
            if reading and isinstance(path, (str, bytes)):
                path = os.fsdecode(path)
                if "__pycache__" not in path:  # bytecode follows its source, which is recorded
                    self.paths.add(path)
        elif event in ("os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes)):
            self.paths.add(os.fsdecode(args[0]))

    def inputs(self) -> dict[str, Any] | None:
        """What the analysis read, with sizes and times; None when it cannot be trusted for a cache."""
        paths = set(self.paths)
        for module in list(sys.modules.values()):
            filename = getattr(module, "__file__", None)
            if isinstance(filename, str):
                paths.add(filename)
        paths.update(entry or os.getcwd() for entry in sys.path if isinstance(entry, str))
        files = {}
        for path in paths:
            absolute = os.path.abspath(path)
            if absolute.startswith(_IGNORED_ROOTS):
                continue
            stamp = file_stamp(absolute)
            if stamp is not None and stamp[1] / 1e9 > self.started - RACY_SECONDS:
                return None  # changed while (or just before) it was read: the next run must look again
            files[absolute] = stamp
        return {"files": files, "environment": dict(self.variables)}


def file_stamp(path: str) -> list[int] | None:
    """Size and modification time in ns; None for a path that does not exist (its appearing counts too)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


class AnalysisCache:
    """Answers kept by request, valid while their inputs are unchanged (see the module's docstring)."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_directory()

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        settings = {k: v for k, v in request["settings"].items() if k not in _NOT_IN_KEY}
        identity = {
            "format": FORMAT, "environment_prefix": sys.prefix, "version": sys.version,
            "request": {**{k: v for k, v in request.items() if k != "debug"}, "settings": settings},
            "environment": {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES_IN_KEY)},
        }
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def lookup(self, request: dict[str, Any]) -> dict[str, Any] | None:
        """The kept answer for this request, or None (none kept, inputs changed, unreadable entry)."""
        entry_path = self.directory / f"{self.key(request)}.json"
        try:
            entry = json.loads(entry_path.read_text(encoding="utf-8"))
            inputs, answer = entry["inputs"], entry["answer"]
            if not _unchanged(inputs):
                return None
            os.utime(entry_path)  # recently used: kept longest
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return answer

    def store(self, request: dict[str, Any], answer: dict[str, Any], inputs: dict[str, Any]) -> None:
        """Keep an answer (written whole or not at all); a cache that cannot be written is skipped."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump({"inputs": inputs, "answer": answer}, stream)
            os.replace(temporary, self.directory / f"{self.key(request)}.json")
            self._prune()
        except OSError:
            return

    def _prune(self) -> None:
        entries = sorted(self.directory.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        for stale in entries[:-MAX_ENTRIES]:
            stale.unlink(missing_ok=True)


def _unchanged(inputs: dict[str, Any]) -> bool:
    for path, stamp in inputs["files"].items():
        if file_stamp(path) != stamp:
            return False
    return all(os.environ.get(key) == value for key, value in inputs["environment"].items())
