"""Output formats (sarif, github, junit, statistics), model-analysis errors in each, and the progress line."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

from conftest import memlint
from memlint.diagnostics import Diagnostic, Severity
from memlint.engine import CheckResult
from memlint.errors import ModelError
from memlint.reporters import FORMATS, get_reporter
from memlint.reporters.github import command, escape_data, escape_property

SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text(encoding="utf-8"))

OVER_BUDGET = """
    import torch
    from torch import nn
    from torch.utils.data import DataLoader


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 10))

        def forward(self, x):
            scale = torch.ones(x.shape[0], 1)
            return self.body(x) * scale


    def example_inputs(batch_size):
        return torch.randn(batch_size, 256)


    def train(dataset):
        model = Net().cuda()
        loader = DataLoader(dataset, batch_size=65536, num_workers=1, pin_memory=True, persistent_workers=True)
        for x, y in loader:
            model(x.cuda()).sum().backward()
"""
CONFIG = """
    [tool.memlint]
    target = "mem:256MiB"
    threshold = 1.0
    optimizer = "sgd"
"""
BROKEN = """
    from torch import nn


    def build_model():
        raise RuntimeError("the config file is missing")
"""


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git repository (a `.git` folder is all the reporters look for) with the config in a sub-folder."""
    root = tmp_path_factory.mktemp("repo")
    (root / ".git").mkdir()
    sub = root / "proj"
    (sub / "models").mkdir(parents=True)
    (sub / "pyproject.toml").write_text(textwrap.dedent(CONFIG).lstrip())
    (sub / "models" / "net.py").write_text(textwrap.dedent(OVER_BUDGET).lstrip())
    (sub / "models" / "broken.py").write_text(textwrap.dedent(BROKEN).lstrip())
    return sub


@pytest.fixture(scope="module")
def sarif_run(project: Path):
    out = project / "out.sarif"
    run = memlint("check", "models/net.py", "--output-format", "sarif", "-o", str(out), cwd=project)
    return run, json.loads(out.read_text(encoding="utf-8"))


def test_formats_are_registered():
    assert set(FORMATS) >= {"text", "rich", "json", "sarif", "github", "junit"}
    for name in FORMATS:
        assert callable(get_reporter(name))


def test_sarif_validates_against_the_official_schema(sarif_run):
    run, document = sarif_run
    assert run.code == 1, run.err
    assert run.out == ""  # -o: everything went to the file
    jsonschema.validate(document, SCHEMA)
    assert document["version"] == "2.1.0"


def test_sarif_has_what_github_code_scanning_reads(sarif_run, project: Path):
    _, document = sarif_run
    (sarif_run_,) = document["runs"]
    driver = sarif_run_["tool"]["driver"]
    assert driver["name"] == "memlint" and driver["version"]
    rules = {rule["id"]: rule for rule in driver["rules"]}
    assert {"MEM001", "MEM002", "MEM003", "DEV001", "E001"} <= set(rules)
    mem001 = rules["MEM001"]
    assert mem001["shortDescription"]["text"] and mem001["fullDescription"]["text"]
    assert "## Why is this bad?" in mem001["help"]["markdown"] and mem001["help"]["text"]
    assert mem001["defaultConfiguration"]["level"] == "error"
    results = {result["ruleId"]: result for result in sarif_run_["results"]}
    assert {"MEM001", "DEV001"} <= set(results)
    for result in sarif_run_["results"]:
        assert result["level"] in ("error", "warning", "note")
        assert driver["rules"][result["ruleIndex"]]["id"] == result["ruleId"]
        location = result["locations"][0]["physicalLocation"]
        # Relative to the repository root (the `.git` folder), not to the config's folder.
        assert location["artifactLocation"] == {"uri": "proj/models/net.py", "uriBaseId": "%SRCROOT%"}
        assert location["region"]["startLine"] >= 1 and location["region"]["startColumn"] >= 1
    mem001_result = results["MEM001"]
    assert mem001_result["level"] == "error" and "batch size 65536" in mem001_result["message"]["text"]
    line = mem001_result["locations"][0]["physicalLocation"]["region"]["startLine"]
    assert "DataLoader(" in (project / "models" / "net.py").read_text().splitlines()[line - 1]
    assert sarif_run_["invocations"][0]["executionSuccessful"] is True


def test_github_annotations_and_their_escaping(project: Path):
    run = memlint("check", "models/net.py", "--output-format", "github", cwd=project)
    assert run.code == 1, run.err
    lines = [line for line in run.out.splitlines() if line.startswith("::")]
    mem001 = next(line for line in lines if "title=memlint (MEM001)" in line)
    assert mem001.startswith("::error file=proj/models/net.py,line=")
    source = (project / "models" / "net.py").read_text().splitlines()
    line = int(mem001.split("line=")[1].split(",")[0])
    assert "DataLoader(" in source[line - 1]
    # "over 100% of" and the help line: % and newline escaped, so one annotation stays one line.
    assert "100%25 of mem%3A256MiB" not in mem001  # ':' is escaped in properties only
    assert "100%25 of mem:256MiB" in mem001 and "%0Ahelp: use batch size" in mem001
    dev001 = next(line for line in lines if "title=memlint (DEV001)" in line)
    assert dev001.startswith(("::warning ", "::notice "))
    # Not an annotation, but a plain log line per analysed model.
    assert any(line.startswith("memlint: models/net.py: Net on mem:256MiB") for line in run.out.splitlines())


def test_github_escaping_is_the_toolkits():
    assert escape_data("a%b\r\nc:d,e") == "a%25b%0D%0Ac:d,e"
    assert escape_property("a%b\r\nc:d,e") == "a%25b%0D%0Ac%3Ad%2Ce"
    assert command("error", {"file": "a,b:c.py", "line": 3, "col": 1, "title": "memlint (MEM001)"}, "50% over\n") \
        == "::error file=a%2Cb%3Ac.py,line=3,col=1,title=memlint (MEM001)::50%25 over%0A"


def test_junit_has_one_suite_a_case_per_file_and_a_failure_per_diagnostic(project: Path, tmp_path: Path):
    clean = project / "models" / "clean.py"
    clean.write_text("x = 1\n")
    try:
        run = memlint("check", "models/net.py", "models/clean.py", "--output-format", "junit", cwd=project)
    finally:
        clean.unlink()
    assert run.code == 1, run.err
    root = ET.fromstring(run.out)
    suites = root.findall("testsuite")
    assert len(suites) == 1
    cases = {case.get("name"): case for case in suites[0].findall("testcase")}
    assert set(cases) == {"models/net.py", "models/clean.py"}
    assert suites[0].get("tests") == "2" and suites[0].get("failures") == "1" and suites[0].get("errors") == "0"
    failures = cases["models/net.py"].findall("failure")
    assert {f.get("type") for f in failures} >= {"MEM001", "DEV001"}
    assert all(f.text and f.text.startswith("models/net.py:") for f in failures)
    assert not list(cases["models/clean.py"])


def test_statistics_counts_per_rule(project: Path):
    text = memlint("check", "models/net.py", "--statistics", "--select", "DEV001,MEM001", cwd=project)
    assert text.code == 1, text.err
    rows = [line.split("\t") for line in text.out.splitlines()]
    assert sorted(row[1] for row in rows) == ["DEV001", "MEM001"]
    assert all(row[0].strip() == "1" for row in rows)
    as_json = memlint("check", "models/net.py", "--statistics", "--output-format", "json", "--no-import",
                      cwd=project)
    assert as_json.json() == [{"code": "DEV001", "name": "cpu-factory-in-forward", "count": 1}]
    refused = memlint("check", "models/net.py", "--statistics", "--output-format", "sarif", cwd=project)
    assert refused.code == 2 and "--statistics" in refused.err


@pytest.mark.parametrize("fmt", ["text", "json", "sarif", "github", "junit"])
def test_analysis_errors_appear_in_every_format_with_exit_code_2(project: Path, fmt: str):
    run = memlint("check", "models/broken.py", "--output-format", fmt, cwd=project)
    assert run.code == 2, (run.out, run.err)
    assert "the config file is missing" in run.out
    if fmt == "sarif":
        document = json.loads(run.out)
        jsonschema.validate(document, SCHEMA)
        (result,) = [r for r in document["runs"][0]["results"] if r["ruleId"] == "E001"]
        assert result["level"] == "error"
        assert result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "proj/models/broken.py"
        assert document["runs"][0]["invocations"][0]["executionSuccessful"] is False
    elif fmt == "github":
        assert run.out.startswith("::error file=proj/models/broken.py,line=")
        assert "title=memlint (E001)" in run.out
    elif fmt == "junit":
        case = ET.fromstring(run.out).find("testsuite/testcase")
        assert case.get("name") == "models/broken.py" and case.find("error").get("type") == "E001"
    elif fmt == "json":
        assert run.json()["errors"][0]["path"] == "models/broken.py"


def test_reporters_only_format(tmp_path: Path):
    """Reporters read a CheckResult; no analysis needed, and an error without a path still shows."""
    result = CheckResult(
        diagnostics=[Diagnostic("a.py", 3, 5, "DEV002", Severity.INFO, "50% of it,\nsecond line")],
        errors=[ModelError("the analysis did not finish")], files_checked=1, files=["a.py"], root=str(tmp_path))
    for name in ("sarif", "github", "junit", "json", "text"):
        from io import StringIO
        out = StringIO()
        get_reporter(name)(result, out, False)
        assert "the analysis did not finish" in out.getvalue(), name
    out = StringIO()
    get_reporter("sarif")(result, out, False)
    document = json.loads(out.getvalue())
    jsonschema.validate(document, SCHEMA)
    levels = {r["ruleId"]: r["level"] for r in document["runs"][0]["results"]}
    assert levels == {"E001": "error", "DEV002": "note"}
    out = StringIO()
    get_reporter("github")(result, out, False)
    assert "::error title=memlint (E001)::E001 the analysis did not finish" in out.getvalue()
    assert "::notice file=a.py,line=3,col=5,title=memlint (DEV002)::DEV002 50%25 of it,%0Asecond line" \
        in out.getvalue()


# --- the progress line -------------------------------------------------------------------------------

def _run_with_terminal_stderr(args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Run memlint with stderr on a pseudo-terminal (as at a shell) and stdout in a pipe."""
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "memlint", *args], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=follower, stdin=subprocess.DEVNULL, env=env)
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    out = process.stdout.read().decode() if process.stdout else ""
    process.wait(timeout=60)
    os.close(leader)
    return process.returncode, out, b"".join(chunks).decode(errors="replace")


def test_progress_shows_on_a_terminal_and_never_in_machine_output(project: Path):
    code, out, terminal = _run_with_terminal_stderr(["check", "models/net.py"], project)
    assert code == 1
    assert "analysing models" in terminal and "models/net.py on mem:256MiB" in terminal
    assert "analysing models" not in out
    code, out, terminal = _run_with_terminal_stderr(["check", "models/net.py", "--output-format", "json"], project)
    assert code == 1 and json.loads(out)["models"]
    assert "analysing models" not in terminal
    # stderr in a pipe (CI): no status line either
    piped = memlint("check", "models/net.py", cwd=project)
    assert "analysing models" not in piped.err and "analysing models" not in piped.out
