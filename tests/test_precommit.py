"""pre-commit: the static hook never needs torch, named files are analysed only when they are models,
and the hooks run for real through `pre-commit try-repo` / `pre-commit run` (slow: they build hook envs)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, memlint

BAD = """
    import torch
    from torch import nn


    class Net(nn.Module):
        def forward(self, x):
            return x + torch.zeros(3)
"""
GOOD = """
    def add(a, b):
        return a + b
"""
# A file that must never be imported: importing it leaves a marker file.
SCRIPT = """
    import pathlib
    pathlib.Path(__file__).with_name("IMPORTED").write_text("imported")
    import torch
    from torch import nn


    class Helper(nn.Module):
        def forward(self, x):
            return x
"""
MODEL = """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader


    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(64, 64)

        def forward(self, x):
            return self.layer(x)


    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(64, 4096)

        def forward(self, x):
            return self.layer(x)


    def example_inputs(batch_size):
        return torch.randn(batch_size, 64)


    def train(dataset):
        loader = DataLoader(dataset, batch_size=BATCH, num_workers=1, pin_memory=True, persistent_workers=True)
"""
TORCH_BLOCKER = """
import sys


class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"memlint --no-import imported {name}")
        return None


sys.meta_path.insert(0, BlockTorch())
from memlint.cli import main

code = main(sys.argv[1:])
leaked = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
sys.stderr.write(f"\\nTORCH-MODULES {leaked}\\n")
sys.exit(code)
"""


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=memlint-test", "-c", "user.email=test@memlint.invalid",
                    "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
                   cwd=folder, check=True, capture_output=True)


# --- the static hook needs no torch ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["text", "json", "sarif", "github", "junit"])
def test_no_import_never_imports_torch(tmp_path: Path, fmt: str):
    _write(tmp_path, "pkg/bad.py", BAD)
    _write(tmp_path, "pkg/good.py", GOOD)
    wrapper = _write(tmp_path, "run_without_torch.py", TORCH_BLOCKER)
    done = subprocess.run([sys.executable, str(wrapper), "check", "--no-import", "--output-format", fmt, "pkg",
                           "pkg/bad.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "DEV001" in done.stdout
    assert "TORCH-MODULES []" in done.stderr, done.stderr


# --- which named files are analysed ------------------------------------------------------------------

def test_named_files_without_a_model_are_linted_not_imported(tmp_path: Path):
    """As pre-commit names every changed file: a script is never executed, a model file is analysed."""
    _write(tmp_path, "tools/script.py", SCRIPT.replace("class Helper(nn.Module)", "class Helper(object)"))
    _write(tmp_path, "model.py", MODEL.replace("BATCH", "8"))
    run = memlint("check", "tools/script.py", "model.py", "--target", "h100-80gb", "--model", "Small",
                  "--ignore", "MEM003", "--output-format", "json", cwd=tmp_path)
    assert run.code == 0, run.err
    assert not (tmp_path / "tools" / "IMPORTED").exists()
    assert [(m["path"], m["name"]) for m in run.json()["models"]] == [("model.py", "Small")]
    plain = memlint("check", "tools/script.py", cwd=tmp_path)
    assert plain.code == 0 and "no model found" not in plain.err
    assert not (tmp_path / "tools" / "IMPORTED").exists()


def test_configured_models_decide_which_named_files_are_analysed(tmp_path: Path):
    _write(tmp_path, "pyproject.toml", """
        [tool.memlint]
        target = "h100-80gb"
        ignore = ["MEM003"]
        models = ["nets/*.py:Big"]
    """)
    _write(tmp_path, "nets/model.py", MODEL.replace("BATCH", "8"))
    _write(tmp_path, "tests/helpers.py", SCRIPT)  # defines an nn.Module, but is not a configured model
    run = memlint("check", "nets/model.py", "tests/helpers.py", "--output-format", "json", cwd=tmp_path)
    assert run.code == 0, run.err
    assert not (tmp_path / "tests" / "IMPORTED").exists()
    # "path:Name" picks the model: Big only, not Small.
    assert [(m["path"], m["name"]) for m in run.json()["models"]] == [("nets/model.py", "Big")]


# --- pre-commit for real -----------------------------------------------------------------------------

def _hook_repository(tmp_path: Path) -> Path:
    """The repository root as a git repository at one commit, as `pre-commit try-repo REPO` clones it.

    try-repo on the working tree itself would leave out files not yet added to git (it copies
    tracked changes only); a committed copy of the files the package is built from works both in
    a working tree and in CI's fresh clone.
    """
    copy = tmp_path / "memlint-hooks"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "venv", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".hypothesis", "build",
        "dist", "tests", "benchmarks"))
    _git(copy, "init", "-q")
    _git(copy, "add", "-A")
    _git(copy, "commit", "-q", "-m", "memlint")
    return copy


def _user_repository(tmp_path: Path) -> Path:
    user = tmp_path / "user"
    _write(user, "bad.py", BAD)
    _write(user, "good.py", GOOD)
    _git(user, "init", "-q")
    _git(user, "add", "-A")
    return user


def _pre_commit(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PRE_COMMIT_HOME": str(home), "PRE_COMMIT_COLOR": "never",
           # the `memlint` hook is `language: system`: it runs the memlint of this environment
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PRE_COMMIT", None)
    return subprocess.run([sys.executable, "-m", "pre_commit", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_pre_commit_try_repo_static_hook_fails_and_passes(tmp_path: Path):
    """`pre-commit try-repo` builds the hook's own environment (pip install of memlint: libcst, rich)."""
    hooks, user = _hook_repository(tmp_path), _user_repository(tmp_path)
    failing = _pre_commit("try-repo", str(hooks), "memlint-static", "--files", "bad.py", cwd=user,
                          home=tmp_path / "cache")
    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert "memlint (static rules, no model import)" in failing.stdout and "Failed" in failing.stdout
    assert "bad.py:7:20: DEV001" in failing.stdout
    passing = _pre_commit("try-repo", str(hooks), "memlint-static", "--files", "good.py", cwd=user,
                          home=tmp_path / "cache")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "Passed" in passing.stdout


@pytest.mark.slow
def test_pre_commit_static_hook_environment_has_no_torch(tmp_path: Path):
    """The README's `.pre-commit-config.yaml` for the static hook: its environment never installs torch."""
    hooks, user = _hook_repository(tmp_path), _user_repository(tmp_path)
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=hooks, capture_output=True, text=True,
                              check=True).stdout.strip()
    (user / ".pre-commit-config.yaml").write_text(textwrap.dedent(f"""
        repos:
          - repo: {hooks}
            rev: {revision}
            hooks:
              - id: memlint-static
    """).lstrip())
    home = tmp_path / "cache"
    run = _pre_commit("run", "--files", "bad.py", "good.py", cwd=user, home=home)
    assert run.returncode == 1 and "DEV001" in run.stdout, run.stdout + run.stderr
    installed = {path.name.lower() for path in home.glob("*/py_env-*/lib/python*/site-packages/*")}
    assert "memlint" in installed or any(name.startswith("memlint") for name in installed), sorted(installed)
    assert "libcst" in installed and "rich" in installed
    assert not any(name == "torch" or name.startswith("torch-") for name in installed), sorted(installed)


@pytest.mark.slow
def test_pre_commit_model_hook_analyses_only_changed_model_files(tmp_path: Path):
    """The `memlint` hook (language: system) with pass_filenames: configured model files are analysed."""
    hooks = _hook_repository(tmp_path)
    user = tmp_path / "user"
    _write(user, "pyproject.toml", """
        [tool.memlint]
        target = "mem:256MiB"
        threshold = 1.0
        optimizer = "sgd"
        select = ["MEM001", "E"]
        models = ["nets/*.py:Big"]
    """)
    _write(user, "nets/model.py", MODEL.replace("BATCH", "65536"))
    _write(user, "scripts/helpers.py", SCRIPT)
    _git(user, "init", "-q")
    _git(user, "add", "-A")
    over = _pre_commit("try-repo", str(hooks), "memlint", "--files", "nets/model.py", "scripts/helpers.py",
                       cwd=user, home=tmp_path / "cache")
    assert over.returncode == 1, over.stdout + over.stderr
    assert "nets/model.py:" in over.stdout and "MEM001" in over.stdout and "batch size 65536" in over.stdout
    assert not (user / "scripts" / "IMPORTED").exists()
    helpers_only = _pre_commit("try-repo", str(hooks), "memlint", "--files", "scripts/helpers.py", cwd=user,
                               home=tmp_path / "cache")
    assert helpers_only.returncode == 0, helpers_only.stdout + helpers_only.stderr
    assert not (user / "scripts" / "IMPORTED").exists()


def test_hooks_file_declares_both_hooks():
    import yaml  # pre-commit's own dependency

    hooks = {hook["id"]: hook for hook in yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())}
    assert hooks["memlint-static"]["language"] == "python"
    assert hooks["memlint-static"]["entry"] == "memlint check --no-import"
    assert hooks["memlint"]["language"] == "system" and hooks["memlint"]["entry"].startswith("memlint check")
    pyproject = (REPO / "pyproject.toml").read_text()
    dependencies = pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]
    assert "torch" not in dependencies  # the static hook's environment installs only these
