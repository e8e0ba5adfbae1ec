"""Shared helpers: run the real ``memlint`` command in a subprocess, write model files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(__file__).resolve().parent / "models"

# Every test analyses afresh (and the commands they start too): a test of the analysis must not be
# answered by another test's kept answer. tests/test_cache.py turns the cache on for itself.
os.environ["MEMLINT_NO_CACHE"] = "1"
# Nor by an analysis server a developer left running (memlint.server): the tests that use one start
# their own, in a private temporary folder (the ``analysis_server`` fixture).
os.environ.setdefault("MEMLINT_NO_SERVER", "1")  # MEMLINT_NO_SERVER=0: the whole suite through your server


# A minimal model file that analyses quickly, for tests of the command's behaviour.
MODEL = textwrap.dedent("""
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(64, 10)

        def forward(self, x):
            return self.layer(x)
""").lstrip()


def line_of(path: Path, snippet: str) -> int:
    """1-based number of the first line of ``path`` that contains ``snippet``."""
    return next(number for number, line in enumerate(path.read_text().splitlines(), 1) if snippet in line)


class Run:
    def __init__(self, done: subprocess.CompletedProcess) -> None:
        self.code = done.returncode
        self.out = done.stdout
        self.err = done.stderr

    def json(self) -> dict[str, Any]:
        return json.loads(self.out)


def memlint(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict[str, str] | None = None) -> Run:
    """Run the installed command exactly as a user would (``python -m memlint``), in ``env`` if given."""
    done = subprocess.run([sys.executable, "-m", "memlint", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)
    return Run(done)


@pytest.fixture
def write(tmp_path: Path):
    """Write a dedented file under tmp_path and return its path."""
    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
        return path
    return _write


@pytest.fixture(scope="session")
def analysis_server():
    """A warm analysis server of its own (socket in a private TMPDIR); the environment that reaches it."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the analysis server runs on Linux only")
    import shutil

    environment = server_environment()
    started = memlint("server", "start", "--idle-timeout", "900", env=environment)
    assert started.code == 0 and "started" in started.out, started.out + started.err
    yield environment
    memlint("server", "stop", env=environment, timeout=60)
    shutil.rmtree(environment["TMPDIR"], ignore_errors=True)


def server_environment() -> dict[str, str]:
    """This environment with servers allowed, and their sockets in a private TMPDIR of its own."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="mls-", dir="/tmp")  # short: a socket's path has a length limit
    environment = {**os.environ, "TMPDIR": folder}
    environment.pop("MEMLINT_NO_SERVER")
    return environment


def served_analyses(environment: dict[str, str]) -> int:
    """How many analyses the server reached by ``environment`` has forked."""
    return server_state(environment)["analyses"]


def server_state(environment: dict[str, str]) -> dict[str, Any]:
    """``memlint server status --json`` of the server reached by ``environment``, which must be running."""
    done = memlint("server", "status", "--json", env=environment, timeout=60)
    assert done.code == 0, done.out + done.err
    return json.loads(done.out)


@pytest.fixture(params=["spawned", "served"])
def launcher(request, monkeypatch):
    """Run the test's checks with a spawned worker, then again with workers forked by a warm server."""
    if request.param == "spawned":
        yield request.param
        return
    environment = request.getfixturevalue("analysis_server")
    before = served_analyses(environment)
    monkeypatch.setenv("TMPDIR", environment["TMPDIR"])
    monkeypatch.delenv("MEMLINT_NO_SERVER")
    yield request.param
    assert served_analyses(environment) > before, "the checks did not reach the server"
