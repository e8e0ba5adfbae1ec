"""The warm analysis server (memlint/server.py): a served check answers as a spawned one does.

tests/test_isolation.py runs its hang, memory, crash, garbage, concurrency and orphan tests
through a server too (the ``launcher`` fixture). Here: what the user's code sees, the cache's
record, which checks may use a server, and its life (start, stop, idle, a dead server).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import MODEL, memlint, server_environment, served_analyses, server_state

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the analysis server runs on Linux only")


def spawning(environment: dict[str, str]) -> dict[str, str]:
    return {**environment, "MEMLINT_NO_SERVER": "1"}


# A model file that writes down what its code sees of the process it runs in.
WHAT_THE_FILE_SEES = MODEL + '''
import json, os, sys
import helper, extra_helper
json.dump({"path": sys.path[:2], "argv": [os.path.basename(a) for a in sys.argv], "cwd": os.getcwd(),
           "flavour": os.environ.get("MODEL_FLAVOUR"), "name": __name__.rstrip("0123456789"),
           "helpers": [helper.NAME, extra_helper.NAME],
           "stdin": sys.stdin.read()}, open(os.environ["RECORD"], "w"))
'''


def test_a_served_check_answers_and_runs_the_file_as_a_spawned_one(analysis_server, tmp_path):
    tree, extra = tmp_path / "tree", tmp_path / "extra"
    tree.mkdir()
    extra.mkdir()
    (tree / "model.py").write_text(WHAT_THE_FILE_SEES)
    (tree / "helper.py").write_text("NAME = 'beside the model'\n")
    (extra / "extra_helper.py").write_text("NAME = 'on PYTHONPATH'\n")
    outputs, seen = {}, {}
    for how in ("spawned", "served"):
        environment = {**(spawning(analysis_server) if how == "spawned" else analysis_server),
                       "PYTHONPATH": str(extra), "MODEL_FLAVOUR": "plain", "RECORD": str(tmp_path / f"{how}.json")}
        before = served_analyses(analysis_server)
        done = memlint("check", "model.py", "--input-shape", "64", "--output-format", "json", cwd=tree,
                       env=environment)
        assert done.code in (0, 1), done.out + done.err
        assert served_analyses(analysis_server) - before == (how == "served")
        outputs[how], seen[how] = json.loads(done.out), json.loads((tmp_path / f"{how}.json").read_text())
    assert seen["served"] == seen["spawned"]
    assert seen["served"]["path"] == [str(tree), str(extra)] and seen["served"]["flavour"] == "plain"
    assert seen["served"]["stdin"] == ""  # the request was read by memlint; the user's code finds stdin empty
    assert outputs["served"] == outputs["spawned"]


def test_a_served_analysis_is_kept_by_the_cache_with_what_it_read(analysis_server, tmp_path):
    path = tmp_path / "tree" / "model.py"  # the cache's folder beside, not in, the model's (which is an input)
    path.parent.mkdir()
    path.write_text(MODEL)
    past = time.time() - 60  # a file modified just before an analysis is not trusted for the cache
    for written in (path, path.parent):
        os.utime(written, (past, past))
    environment = {**analysis_server, "MEMLINT_CACHE_DIR": str(tmp_path / "cache")}
    environment.pop("MEMLINT_NO_CACHE")
    runs = []
    for _ in range(2):
        before = served_analyses(analysis_server)
        done = memlint("check", str(path), "--input-shape", "64", "--output-format", "json", env=environment)
        assert done.code in (0, 1), done.err
        runs.append((served_analyses(analysis_server) - before, json.loads(done.out)))
    assert [count for count, _ in runs] == [1, 0]  # the second check was answered from the cache
    assert runs[0][1] == runs[1][1]
    (entry,) = (tmp_path / "cache").glob("*.json")
    files = json.loads(entry.read_text())["inputs"]["files"]
    # What the server imported before the fork counts as read: a new torch must invalidate the answer.
    assert str(path) in files and any(name.endswith(os.path.join("torch", "__init__.py")) for name in files)


def test_a_server_serves_only_checks_of_its_own_environment(analysis_server, tmp_path):
    path = tmp_path / "model.py"
    path.write_text(MODEL)
    before = served_analyses(analysis_server)
    # torch reads TORCH_* variables at import: the server imported it with other values.
    environment = {**analysis_server, "TORCH_SHOW_CPP_STACKTRACES": "1"}
    done = memlint("check", str(path), "--input-shape", "64", env=environment)
    assert done.code in (0, 1), done.err
    assert memlint("server", "status", env=environment).code == 1  # none for that environment
    done = memlint("check", str(path), "--input-shape", "64", env=spawning(analysis_server))
    assert done.code in (0, 1), done.err
    assert served_analyses(analysis_server) == before


def test_a_server_starts_once_stops_when_idle_and_a_dead_one_is_replaced(tmp_path):
    environment = server_environment()
    socket_folder = Path(environment["TMPDIR"]) / f"memlint-{os.getuid()}"
    path = tmp_path / "model.py"
    path.write_text(MODEL)

    first = memlint("server", "start", "--idle-timeout", "300", env=environment)
    assert first.code == 0 and "started" in first.out, first.out + first.err
    again = memlint("server", "start", env=environment)
    assert again.code == 0 and "already running" in again.out
    assert oct(socket_folder.stat().st_mode & 0o777) == "0o700"
    pid = int(first.out.split("pid ")[1].split(",")[0])
    os.kill(pid, signal.SIGKILL)  # no chance to remove its socket
    while Path(f"/proc/{pid}").exists() and open(f"/proc/{pid}/stat").read().split(") ")[1][0] not in "ZX":
        time.sleep(0.05)
    assert list(socket_folder.glob("*.sock")), "the dead server's socket should still be there"
    done = memlint("check", str(path), "--input-shape", "64", env=environment)
    assert done.code in (0, 1) and "Traceback" not in done.err, done.err  # spawned instead
    assert memlint("server", "status", env=environment).code == 1

    second = memlint("server", "start", "--idle-timeout", "1", env=environment)
    assert second.code == 0 and "started" in second.out, second.out + second.err
    deadline = time.monotonic() + 30
    while list(socket_folder.glob("*.sock")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list(socket_folder.glob("*.sock")), "an idle server should stop and remove its socket"
    stopped = memlint("server", "stop", env=environment)
    assert stopped.code == 0 and "none running" in stopped.out
    status = memlint("server", "status", "--json", env=environment)
    assert status.code == 1 and json.loads(status.out) == {"running": False}


def test_server_command_errors_are_one_paragraph():
    done = memlint("server", "start", "--idle-timeout", "0")
    assert done.code == 2 and "--idle-timeout must be a positive number" in done.err
    assert "Traceback" not in done.err
    done = memlint("server", "restart")
    assert done.code == 2 and "invalid choice" in done.err


def test_the_server_learns_the_installed_modules_an_analysis_imports_never_the_users(analysis_server, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "model.py").write_text("import helper, jsonschema\n" + MODEL)  # jsonschema: installed, unused by memlint
    (tree / "helper.py").write_text("NAME = 'the user\\'s own'\n")

    outputs = []
    for _ in range(2):
        done = memlint("check", "model.py", "--input-shape", "64", "--output-format", "json", cwd=tree,
                       env=analysis_server)
        assert done.code in (0, 1), done.err
        outputs.append(json.loads(done.out))
        deadline = time.monotonic() + 30
        while server_state(analysis_server)["learned"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)  # the server imports what it learned while it is idle
    assert outputs[0] == outputs[1]
    (imports,) = (Path(analysis_server["TMPDIR"]) / f"memlint-{os.getuid()}").glob("*.imports")
    names = json.loads(imports.read_text())
    assert "jsonschema" in names and "helper" not in names and not any("memlint_user" in name for name in names)


def test_learned_imports_are_imported_and_watched_for_changes(tmp_path, monkeypatch):
    from memlint.server import LearnedImports

    package = tmp_path / "site"
    package.mkdir()
    (package / "learned_module_for_memlint_tests.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(package))
    learned = LearnedImports(tmp_path / "list.imports")
    learned.path.write_text(json.dumps(["learned_module_for_memlint_tests"]))
    assert learned.update() is None and len(learned) == 1
    assert "learned_module_for_memlint_tests" in sys.modules and learned.changed() is None
    (package / "learned_module_for_memlint_tests.py").write_text("VALUE = 22\n")  # an upgrade
    assert learned.changed() == str(package / "learned_module_for_memlint_tests.py")
    sys.modules.pop("learned_module_for_memlint_tests")
