"""The CI gate: `memlint check --diff BASE` on a real git repository, and the shipped GitHub workflow."""
from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, memlint

CONFIG = """
    [tool.memlint]
    target = "mem:256MiB"
    threshold = 1.0
    optimizer = "sgd"
    select = ["MEM001", "MEM002", "DEV001", "E"]
    models = ["model.py"]
"""
MODEL = """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10))

        def forward(self, x):
            return self.body(x)


    def example_inputs(batch_size):
        return torch.randn(batch_size, 256)


    def train(dataset):
        model = Net().cuda()
        loader = DataLoader(dataset, batch_size=BATCH)
        for x, y in loader:
            model(x.cuda()).sum().backward()
"""


def _git(folder: Path, *args: str) -> str:
    done = subprocess.run(["git", "-c", "user.name=memlint-test", "-c", "user.email=test@memlint.invalid",
                           "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main", *args],
                          cwd=folder, check=True, capture_output=True, text=True)
    return done.stdout.strip()


def _write(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """main: a model that fits its `mem:` budget at batch size 8."""
    _write(tmp_path, "pyproject.toml", CONFIG)
    _write(tmp_path, "model.py", MODEL.replace("BATCH", "8"))
    _write(tmp_path, "utils.py", "def helper():\n    return 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-q", "-m", "a model that fits")
    return tmp_path


@pytest.mark.slow
def test_gate_fails_when_a_change_pushes_the_model_over_budget(repository: Path):
    base = _git(repository, "rev-parse", "HEAD")
    _git(repository, "switch", "-q", "-c", "bigger-batch")
    _write(repository, "model.py", MODEL.replace("BATCH", "65536"))
    _git(repository, "commit", "-q", "-am", "raise the batch size")

    run = memlint("check", "--diff", "main", "--output-format", "github", cwd=repository)
    assert run.code == 1, run.out + run.err
    annotations = [line for line in run.out.splitlines() if line.startswith("::")]
    assert len(annotations) == 1, annotations
    (annotation,) = annotations
    line = next(number for number, text in enumerate((repository / "model.py").read_text().splitlines(), 1)
                if "DataLoader(" in text)
    assert annotation.startswith(f"::error file=model.py,line={line},col=")
    assert ",title=memlint (MEM001)::MEM001 training Net at batch size 65536" in annotation
    assert "The largest batch size that fits is" in annotation

    # The alias, and the base as a commit: the same gate.
    alias = memlint("check", "--changed-since", base, "--output-format", "github", cwd=repository)
    assert alias.code == 1 and alias.out == run.out

    # Since the branch's own commit, nothing changed: nothing to check.
    clean = memlint("check", "--diff", "HEAD", "--output-format", "github", cwd=repository)
    assert clean.code == 0 and "::" not in clean.out, clean.out + clean.err


@pytest.mark.slow
def test_gate_passes_when_the_change_keeps_the_model_in_budget_and_checks_only_changes(repository: Path):
    _git(repository, "switch", "-q", "-c", "small-change")
    _write(repository, "model.py", MODEL.replace("BATCH", "16"))
    _git(repository, "commit", "-q", "-am", "batch 16")
    run = memlint("check", "--diff", "main", "--output-format", "json", cwd=repository)
    assert run.code == 0, run.out + run.err
    assert [m["batch_size"] for m in run.json()["models"]] == [16]
    # An uncommitted (untracked) file with a finding is part of the change; unchanged files are not.
    _write(repository, "extra.py", """
        import torch
        from torch import nn


        class Extra(nn.Module):
            def forward(self, x):
                return x + torch.zeros(3)
    """)
    run = memlint("check", "--diff", "main", "--no-import", "--output-format", "junit", cwd=repository)
    assert run.code == 1
    assert 'name="extra.py"' in run.out and 'name="model.py"' in run.out and 'name="utils.py"' not in run.out


@pytest.mark.slow
def test_gate_rechecks_configured_models_when_the_config_changes(repository: Path):
    _git(repository, "switch", "-q", "-c", "config-change")
    (repository / "pyproject.toml").write_text(
        (repository / "pyproject.toml").read_text().replace('optimizer = "sgd"', 'optimizer = "sgd"\nbatch-size = 65536'))
    _git(repository, "commit", "-q", "-am", "a larger batch in the config")
    run = memlint("check", "--diff", "main", "--output-format", "github", cwd=repository)
    assert run.code == 1, run.out + run.err
    assert "::error file=model.py," in run.out and "batch size 65536" in run.out


def test_gate_explains_a_missing_base(repository: Path):
    run = memlint("check", "--diff", "origin/main", cwd=repository)
    assert run.code == 2
    assert "no such commit" in run.err and "fetch-depth: 0" in run.err and "Traceback" not in run.err


def test_gate_outside_a_repository_is_a_usage_error(tmp_path: Path):
    _write(tmp_path, "a.py", "x = 1\n")
    run = memlint("check", "a.py", "--diff", "main", cwd=tmp_path)
    assert run.code == 2 and "not inside a git repository" in run.err


def test_example_workflow_is_the_documented_gate():
    import yaml  # pre-commit's dependency, in the test extra

    text = (REPO / "examples" / "github-workflow.yml").read_text()
    workflow = yaml.safe_load(text)
    assert "pull_request" in workflow[True]  # YAML 1.1 reads the key `on` as True
    (job,) = workflow["jobs"].values()
    assert job["permissions"]["security-events"] == "write"
    steps = job["steps"]
    uses = [step.get("uses", "") for step in steps]
    assert any(u.startswith("github/codeql-action/upload-sarif@") for u in uses)
    assert any(u.startswith("actions/checkout@") and step.get("with", {}).get("fetch-depth") == 0
               for u, step in zip(uses, steps))
    scripts = "\n".join(step.get("run", "") for step in steps)
    assert "--diff" in scripts and "--no-import" in scripts and "--output-format sarif" in scripts
    assert "--output-format github" in scripts
    assert "download.pytorch.org/whl/cpu" in scripts
    assert "pull_request_target" not in text  # never run a fork's code with the repository's token
