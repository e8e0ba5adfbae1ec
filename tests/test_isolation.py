"""The user's code runs only in child processes, only when asked, and never changes the user's tree.

Model files are imported in ``python -m memlint.worker`` children (memlint/worker.py), one per
file and target, run in parallel, each in its own process group with a memory limit and a
timeout; or in the same worker forked by a warm analysis server (memlint/server.py): each test
with the ``launcher`` fixture runs both ways. Whatever the user's code does there (hang, allocate
50 GB, exit, print garbage, start processes), memlint answers clearly, survives, and leaves no
process behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import MODEL, REPO, line_of, memlint

def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (containers may never reap those)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def gone_soon(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.1)
    return False


def spawn_sleeper(pid_file: Path) -> str:
    """Model-file code that starts a long-lived grandchild and records its pid."""
    return textwrap.dedent(f"""
        import subprocess, sys
        _sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(pid_file)!r}, "w").write(str(_sleeper.pid))
    """)


def test_file_that_hangs_at_import_is_stopped_with_everything_it_started(write, tmp_path, launcher):
    pid_file = tmp_path / "sleeper.pid"
    path = write("tree/model.py", MODEL + spawn_sleeper(pid_file) + "while True:\n    time_left = 1\n")
    run = memlint("check", str(path), "--input-shape", "64", "--timeout", "3")
    text = run.out + run.err
    assert run.code == 2 and "Traceback" not in text
    assert f"model.py:{line_of(path, 'while True')}:" in text or f"model.py:{line_of(path, 'time_left')}:" in text
    assert "did not finish within 3 s while importing the file" in text and "__main__" in text
    assert gone_soon(int(pid_file.read_text())), "the grandchild outlived the timeout"


def test_file_that_allocates_50_gb_at_import_hits_the_memory_limit(write, launcher):
    path = write("model.py", MODEL + "\nTABLE = torch.ones(50 * 2**30 // 4)  # 50 GB of real memory\n")
    run = memlint("check", str(path), "--input-shape", "64")
    text = run.out + run.err
    assert run.code == 2 and "Traceback" not in text
    assert (f"model.py:{line_of(path, 'TABLE')}: the model file allocated more real memory than the analysis may "
            "use (8 GiB) at import") in text
    assert "--memory-limit" in text


def test_file_that_calls_os_exit_is_reported_with_its_line(write, launcher):
    path = write("model.py", MODEL + "\nimport os\nos._exit(3)\n")
    run = memlint("check", str(path), "--input-shape", "64")
    text = run.out + run.err
    assert run.code == 2 and "Traceback" not in text
    assert f"model.py:{line_of(path, 'os._exit')}: the analysis process exited with code 3 while importing" in text


def test_garbage_on_stdout_does_not_confuse_the_answer(write, launcher):
    path = write("model.py", MODEL.replace("return self.layer(x)", "print('{garbage'); return self.layer(x)") +
                 textwrap.dedent("""
                     import os, sys
                     print("not json {")
                     os.write(1, b'\\x00\\xff{"reports": [], "error": null}\\n')
                     sys.stdout.write('{"reports": [{"forged": true}]}\\n')
                     sys.stdout.flush()
                 """))
    run = memlint("check", str(path), "--input-shape", "64", "--output-format", "json")
    assert run.code in (0, 1), run.err
    document = run.json()  # memlint's own stdout is clean JSON
    assert [model["name"] for model in document["models"]] == ["Net"]
    assert document["errors"] == []


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_two_files_are_analysed_concurrently(write, tmp_path, launcher):
    log = tmp_path / "log"
    log.mkdir()
    paths = []
    for name in ("first", "second"):
        paths.append(write(f"tree/{name}.py", MODEL + textwrap.dedent(f"""
            import time
            _start = time.time()
            time.sleep(3)
            open({str(log / name)!r}, "w").write(f"{{_start}} {{time.time()}}")
        """)))
    start = time.monotonic()
    run = memlint("check", *map(str, paths), "--input-shape", "64", "--timeout", "20", "--output-format", "json")
    wall = time.monotonic() - start
    assert run.code in (0, 1), run.err
    assert len(run.json()["models"]) == 2
    (a0, a1), (b0, b1) = (map(float, (log / name).read_text().split()) for name in ("first", "second"))
    assert a0 < b1 and b0 < a1, "the two imports did not overlap"
    print(f"two files, 3 s sleep each at import: {wall:.1f} s wall")


def test_no_process_outlives_a_normal_run(write, tmp_path, launcher):
    pid_file = tmp_path / "sleeper.pid"
    path = write("tree/model.py", MODEL + spawn_sleeper(pid_file))
    run = memlint("check", str(path), "--input-shape", "64")
    assert run.code in (0, 1), run.out + run.err
    assert gone_soon(int(pid_file.read_text()))


def test_children_stop_when_memlint_is_killed(write, tmp_path, launcher):
    pid_file = tmp_path / "child.pid"
    path = write("tree/model.py", MODEL + textwrap.dedent(f"""
        import os, time
        open({str(pid_file)!r}, "w").write(str(os.getpid()))
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, "-m", "memlint", "check", str(path), "--input-shape", "64",
                               "--timeout", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pid_file.exists()
        time.sleep(0.2)
        child = int(pid_file.read_text())
        parent.send_signal(signal.SIGKILL)  # no chance to clean up: the child's watchdog must
        parent.wait()
        assert gone_soon(child)
    finally:
        parent.kill()


def test_no_import_never_runs_the_file_and_without_it_the_file_runs(write, tmp_path):
    marker = tmp_path / "imported"
    path = write("tree/model.py", f"open({str(marker)!r}, 'w').close()\n" + MODEL)
    run = memlint("check", "--no-import", str(path))
    assert run.code in (0, 1), run.err
    assert not marker.exists()
    run = memlint("check", str(path), "--input-shape", "64")  # proves the test can fail
    assert run.code in (0, 1), run.out + run.err
    assert marker.exists()


def test_static_rules_import_neither_torch_nor_the_users_code(write, tmp_path):
    marker = tmp_path / "imported"
    path = write("tree/model.py", f"open({str(marker)!r}, 'w').close()\n" + MODEL)
    code = ("import sys\nfrom memlint.cli import main\n"
            f"code = main(['check', '--no-import', {str(path)!r}, {str(REPO / 'examples')!r}])\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nsys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    assert not marker.exists()


def test_the_static_pre_commit_hook_never_imports():
    hooks = (REPO / ".pre-commit-hooks.yaml").read_text()
    static = hooks.split("- id: memlint-static", 1)[1].split("- id:", 1)[0]
    assert "--no-import" in static


def tree_digest(root: Path) -> str:
    """Every path under root (directories too) with its content, mode and modification time."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(folder) / name
            info = path.lstat()
            digest.update(f"{path.relative_to(root)}|{info.st_mode}|{info.st_mtime_ns}|{info.st_size}\n".encode())
            if path.is_file():
                digest.update(path.read_bytes())
    return digest.hexdigest()


def test_a_full_check_changes_nothing_in_the_analysed_tree(write, tmp_path):
    write("repo/pyproject.toml", """
        [tool.memlint]
        target = "mem:1GiB"
        models = ["pkg/model.py"]
        input-shape = [64]
    """)
    write("repo/pkg/__init__.py", "")
    write("repo/pkg/layers.py", "from torch import nn\n\n\ndef head():\n    return nn.Linear(64, 10)\n")
    write("repo/pkg/model.py", """
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent))
        from torch import nn

        import layers  # a sibling module: importing it would write __pycache__ if bytecode were written


        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = layers.head()

            def forward(self, x):
                return self.head(x)
    """)
    write("repo/train.py", "import torch\n\nloader = torch.utils.data.DataLoader([], batch_size=8)\n")
    repo = tmp_path / "repo"
    before = tree_digest(repo)
    run = memlint("check", ".", cwd=repo)
    assert run.code in (0, 1), run.out + run.err
    assert "Net" in run.out  # the model was imported and analysed
    assert tree_digest(repo) == before
    assert not list(repo.rglob("__pycache__"))


def test_two_memlint_processes_on_the_same_tree_both_succeed(write, tmp_path):
    path = write("repo/model.py", MODEL)
    command = [sys.executable, "-m", "memlint", "check", str(path), "--input-shape", "64", "--output-format", "json"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [process.communicate(timeout=300) for process in (first, second)]
    assert first.returncode == second.returncode and first.returncode in (0, 1), outputs
    documents = [json.loads(out) for out, _ in outputs]
    assert documents[0]["models"][0]["peak_allocated_bytes"] == documents[1]["models"][0]["peak_allocated_bytes"]
