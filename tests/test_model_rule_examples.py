"""Every model rule's VALID and INVALID examples, run through the real pipeline.

A model rule's examples are model files. Each is written to a temporary directory and checked with
the real command (``python -m memlint check ... --output-format json``), which imports it in a child
process, builds the model on fake tensors, traces and simulates it, and applies the rules. An
example's first line may be ``# memlint check OPTIONS`` (the target, batch size, mode it needs).
Rules that also judge with the model (``also_model``) have their examples that define a model run
here as well, after the model pass has replaced their static findings.

To keep this fast, all examples that need the same options are checked by one command (the
engine analyses the files in parallel child processes), and each case reads its file's findings.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest

from memlint.rules.base import all_rules

HEADER = "# memlint check"
RULES = [rule for rule in all_rules() if rule.needs_model or rule.also_model]


def example_options(source: str) -> tuple[str, ...]:
    lines = textwrap.dedent(source).lstrip("\n").splitlines()
    first = lines[0] if lines else ""
    return tuple(shlex.split(first[len(HEADER):])) if first.startswith(HEADER) else ()


# options -> {file name: source}; every group is checked by one command.
GROUPS: dict[tuple[str, ...], dict[str, str]] = {}
CASES: list[tuple[str, str, int, str]] = []
def defines_model(source: str) -> bool:
    return "def build_model(" in source or "nn.Module)" in source


for _rule in RULES:
    for _kind, _examples in (("valid", _rule.VALID), ("invalid", _rule.INVALID)):
        for _index, _source in enumerate(_examples):
            if not _rule.needs_model and not defines_model(_source):
                continue  # a static rule's snippet with no model: test_rule_examples.py runs it
            _name = f"{_rule.code.lower()}_{_kind}_{_index}.py"
            GROUPS.setdefault(example_options(_source), {})[_name] = _source
            CASES.append((_rule.code, _kind, _index, _name))

# Behaviour across files and options (see the tests at the end), checked by the same commands.
K40_MODEL = """
import torch
from torch import nn

def build_model():
    return nn.Linear(16, 4)

def example_inputs(batch_size):
    return torch.randn(batch_size, 16)
"""
K40 = ("--target", "tesla-k40", "--batch-size", "4")  # not the options of PREC003's own example: one finding per run
GROUPS.setdefault(K40, {}).update({"k40_first.py": K40_MODEL, "k40_second.py": K40_MODEL, "k40_third.py": K40_MODEL})
CONFIGURED_BF16 = ("--target", "gtx1050ti", "--precision", "bf16-mixed", "--batch-size", "4")
GROUPS.setdefault(CONFIGURED_BF16, {}).update({"configured_bf16.py": K40_MODEL})
GROUPS.setdefault(("--target", "a100-80gb", "--precision", "bf16-mixed", "--batch-size", "4"), {}).update(
    {"configured_bf16_ampere.py": K40_MODEL})


@lru_cache(maxsize=None)
def check_group(options: tuple[str, ...], root: str) -> dict[str, list[dict[str, Any]]]:
    """Run ``memlint check`` once over a group's files; findings per file name."""
    folder = Path(root) / f"group{sorted(GROUPS).index(options)}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in GROUPS[options].items():
        (folder / name).write_text(textwrap.dedent(source).lstrip("\n"), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "memlint", "check", *sorted(GROUPS[options]), *options,
                           "--output-format", "json", "--timeout", "240"],
                          capture_output=True, text=True, cwd=folder, timeout=600)
    assert done.stdout.strip(), done.stderr
    document = json.loads(done.stdout)
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in GROUPS[options]}
    for diagnostic in document["diagnostics"]:
        found.setdefault(Path(diagnostic["path"]).name, []).append(diagnostic)
    errors = {Path(error["path"]).name: error["message"] for error in document.get("errors", []) if error.get("path")}
    for name in found:
        found[name] = found[name] + ([{"code": "ERROR", "message": errors[name]}] if name in errors else [])
    return found


@pytest.fixture(scope="session")
def examples_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("model-rule-examples"))


def findings(name: str, root: str) -> list[dict[str, Any]]:
    options = next(options for options, files in GROUPS.items() if name in files)
    return check_group(options, root)[name]


@pytest.mark.parametrize("code,kind,index,name", CASES, ids=[f"{c}-{k}-{i}" for c, k, i, _ in CASES])
def test_model_rule_example(code: str, kind: str, index: int, name: str, examples_root: str) -> None:
    found = findings(name, examples_root)
    rule = next(rule for rule in RULES if rule.code == code)
    codes = [d["code"] for d in found]
    if rule.needs_model:  # a model rule judges nothing when the analysis failed
        errors = [d["message"] for d in found if d["code"] == "ERROR"]
        assert not errors, f"{code} {kind} example {index} did not analyse: {errors}"
    if kind == "invalid":
        assert code in codes, f"{code} did not fire on its INVALID example {index}: {found}"
    else:
        assert code not in codes, f"{code} fired on its VALID example {index}: {found}"


def test_prec003_is_said_once_per_run(examples_root: str) -> None:
    group = check_group(K40, examples_root)
    said = [d for found in group.values() for d in found if d["code"] == "PREC003"]
    assert len(said) == 1, said
    assert "compute capability 3.5" in said[0]["message"]


def test_prec001_judges_the_configured_precision(examples_root: str) -> None:
    [finding] = [d for d in findings("configured_bf16.py", examples_root) if d["code"] == "PREC001"]
    assert "bf16-mixed" in finding["message"] and "native on gtx1050ti: fp32" in finding["message"]
    assert finding["line"] == 4  # build_model()
    assert not [d for d in findings("configured_bf16_ampere.py", examples_root) if d["code"] == "PREC001"]


def test_prec002_states_the_bytes_after_the_analysis(examples_root: str) -> None:
    [default] = [d for d in findings("prec002_invalid_1.py", examples_root) if d["code"] == "PREC002"]
    message = default["message"]
    assert "torch.set_default_dtype(torch.float64)" in message and default["line"] == 4
    assert "Net is built in float64 (544 B of float64 parameters, 100% of them)" in message
    assert "float32 would save ~" in message and "half of parameters" in message


def test_perf001_message_has_speedup_and_memory(examples_root: str) -> None:
    [finding] = [d for d in findings("perf001_invalid_0.py", examples_root) if d["code"] == "PERF001"]
    message = finding["message"]
    assert finding["severity"] == "info" and finding["line"] == 6  # where the Conv2d is built
    assert "Conv2d 0 (32->32 channels, 31x31 kernel on 128x128 planes, batch 8)" in message
    assert "faster in the Fourier domain on cpu" in message and "complex64 spectra" in message
    assert "padded to 192x192" in message  # 128 + 2 * 15 + 31 - 1 = 188, rounded up to 2^6 * 3


def test_perf001_reads_functional_convolutions(examples_root: str) -> None:
    [finding] = [d for d in findings("perf001_invalid_2.py", examples_root) if d["code"] == "PERF001"]
    assert "the conv2d call 1 of the forward (32->32 channels, 25x25 kernel on 128x128 planes" in finding["message"]


def test_perf001_names_the_module_of_a_recorded_aten_convolution(examples_root: str) -> None:
    """A model symbolic_trace cannot follow is traced by its aten ops, each with its module: the finding
    names the Conv2d and points at the line that builds it (make_fx's ops had no module)."""
    [finding] = [d for d in findings("perf001_invalid_3.py", examples_root) if d["code"] == "PERF001"]
    assert finding["line"] == 8
    assert finding["message"].startswith("Conv2d blur (32->32 channels, 31x31 kernel on 128x128 planes, batch 8)")
