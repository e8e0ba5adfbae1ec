"""Every bad input gets one clear paragraph: the file, the line where there is one, what to do.

Through the real command in a subprocess. Exit codes as in ruff: a problem in the user's file
that the linter can point at (a syntax error, E999; a file that is not readable Python, E902)
is a finding, exit code 1; anything that stops the check or the analysis of a model (a model
file that cannot be imported or built, a shape that does not fit, a timeout, a bad option or
configuration, a missing path) is an error, exit code 2. No traceback unless ``--debug``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from conftest import MODEL, line_of, memlint

HERE = Path(__file__).resolve().parent

def output(run) -> str:
    text = run.out + run.err
    assert "Traceback" not in text, text
    return text


def test_syntax_error_is_an_e999_finding_at_its_line(write):
    path = write("broken.py", """
        import torch


        def train(model:
            return model
    """)
    run = memlint("check", str(path))
    text = output(run)
    assert run.code == 1
    assert f"{path}:4:" in text or "broken.py:4:" in text
    assert " E999 syntax error: " in text


def test_model_file_that_raises_on_import(write):
    path = write("model.py", MODEL + "\nraise RuntimeError('no GPU here')\n")
    run = memlint("check", str(path), "--input-shape", "64")
    text = output(run)
    assert run.code == 2
    assert f"model.py:{line_of(path, 'raise')}: importing it raised RuntimeError: no GPU here" in text
    assert "__main__" in text and "--no-import" in text  # what to do


def test_missing_import_names_the_package(write):
    path = write("model.py", "import surely_not_installed_pkg\n" + MODEL)
    run = memlint("check", str(path), "--input-shape", "64")
    text = output(run)
    assert run.code == 2
    assert "model.py:1: importing it failed: module 'surely_not_installed_pkg' is not installed" in text
    assert "pip install surely_not_installed_pkg" in text


def test_model_class_that_needs_constructor_arguments(write):
    path = write("model.py", """
        from torch import nn


        class Net(nn.Module):
            def __init__(self, width):
                super().__init__()
                self.layer = nn.Linear(width, width)

            def forward(self, x):
                return self.layer(x)
    """)
    run = memlint("check", str(path), "--input-shape", "64")
    text = output(run)
    assert run.code == 2
    assert f"model.py:{line_of(path, 'class Net')}: the model classes in the file (Net) all need constructor " \
           "arguments" in text
    assert "build_model()" in text


def test_no_model_found_in_a_configured_model_file(write, tmp_path):
    write("pyproject.toml", """
        [tool.memlint]
        models = ["helpers.py"]
    """)
    write("helpers.py", "def helper(x):\n    return x + 1\n")
    run = memlint("check", "helpers.py", cwd=tmp_path)
    text = output(run)
    assert run.code == 2
    assert "helpers.py: no model found" in text and "build_model()" in text


def test_model_named_with_model_flag_that_does_not_exist(write):
    path = write("model.py", MODEL)
    run = memlint("check", str(path), "--model", "Nett", "--input-shape", "64")
    text = output(run)
    assert run.code == 2
    assert "--model Nett: the file does not define or import Nett" in text


def test_input_shape_that_does_not_fit_names_the_layer_and_line(write):
    path = write("model.py", MODEL)
    run = memlint("check", str(path), "--input-shape", "32")
    text = output(run)
    assert run.code == 2
    assert f"model.py:{line_of(path, 'return self.layer(x)')}: the input does not fit Net in layer (Linear, " \
           "which received (32, 32))" in text
    assert "--input-shape" in text and "per sample" in text and "example_inputs" in text


def test_forward_that_never_returns_is_stopped_at_the_timeout(write):
    path = write("model.py", MODEL.replace("return self.layer(x)", "while True:\n            x = x + 0"))
    start = time.monotonic()
    run = memlint("check", str(path), "--input-shape", "64", "--timeout", "5")
    text = output(run)
    assert run.code == 2
    assert time.monotonic() - start < 60
    assert "did not finish within 5 s" in text and "in forward()" in text and "stopped" in text
    loop = line_of(path, "while True")
    assert f"model.py:{loop}:" in text or f"model.py:{loop + 1}:" in text  # where the forward was stuck
    assert "--timeout" in text


def test_model_too_large_for_the_machine_is_analysed_on_fake_tensors(write):
    # 4 x 500000 x 500000 = 1e12 parameters: 4 TB of weights in fp32, never allocated.
    path = write("huge.py", """
        from torch import nn


        class Huge(nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = nn.Sequential(*[nn.Linear(500_000, 500_000, bias=False) for _ in range(4)])

            def forward(self, x):
                return self.layers(x)
    """)
    done = subprocess.run([sys.executable, str(HERE / "rss_wrapper.py"), "check", str(path), "--input-shape",
                           "500000", "--batch-size", "1", "--target", "h100-80gb", "--output-format", "json"],
                          capture_output=True, text=True, timeout=600)
    assert "Traceback" not in done.stderr, done.stderr
    stats = json.loads(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 1  # MEM001/MEM002: it does not fit, and says so
    model = json.loads(done.stdout)["models"][0]
    assert model["breakdown"]["parameters"] == 4 * 500_000 * 500_000 * 4
    assert {d["code"] for d in json.loads(done.stdout)["diagnostics"]} >= {"MEM002"}
    assert stats["child_rss"] < 1.5 * 2**30 and stats["parent_rss"] < 0.5 * 2**30, stats


def test_unknown_target_suggests_names(write):
    path = write("model.py", MODEL)
    run = memlint("check", str(path), "--target", "h100", "--input-shape", "64")
    text = output(run)
    assert run.code == 2
    assert "unknown target 'h100'" in text and "h100-80gb" in text


def test_malformed_pyproject_names_file_and_line(write, tmp_path):
    write("pyproject.toml", """
        [project]
        name = "demo"

        [tool.memlint
        target = "gtx1050ti"
    """)
    write("model.py", MODEL)
    run = memlint("check", "model.py", cwd=tmp_path)
    text = output(run)
    assert run.code == 2
    assert "pyproject.toml:4: not valid TOML" in text and "fix the syntax" in text


def test_wrong_type_in_tool_memlint_names_key_and_line(write, tmp_path):
    write("pyproject.toml", """
        [tool.memlint]
        target = "gtx1050ti"
        batch-size = "large"
    """)
    write("model.py", MODEL)
    run = memlint("check", "model.py", cwd=tmp_path)
    text = output(run)
    assert run.code == 2
    assert "pyproject.toml:3: [tool.memlint] batch-size must be an integer, not a string ('large')" in text
    assert "batch-size = 128" in text


def test_path_that_does_not_exist(tmp_path):
    run = memlint("check", str(tmp_path / "nope.py"))
    text = output(run)
    assert run.code == 2
    assert "nope.py: no such file or directory" in text


def test_directory_with_thousands_of_files_is_linted_fast_and_statically(tmp_path):
    tree = tmp_path / "repo"
    marker = tmp_path / "imported"
    for index in range(2000):
        folder = tree / f"pkg{index // 100}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"mod{index}.py").write_text(
            f"import torch\n\n\ndef f{index}(x):\n    return x.cuda() + torch.zeros(3)\n", encoding="utf-8")
    (tree / "model.py").write_text(  # a model file: not imported, since directories are linted statically
        f"open({str(marker)!r}, 'w').close()\nfrom torch import nn\n\n\nclass Net(nn.Module):\n    pass\n")
    start = time.monotonic()
    run = memlint("check", str(tree), "--output-format", "json")
    elapsed = time.monotonic() - start
    assert run.code in (0, 1), run.err
    document = run.json()
    assert document["models"] == [] and document["errors"] == []
    assert not marker.exists()
    assert elapsed < 90, elapsed  # about 10 s on 2 loaded cores


def test_empty_file_is_clean_and_an_empty_model_file_is_an_error(write, tmp_path):
    empty = write("empty.py", "")
    run = memlint("check", str(empty))
    assert run.code == 0 and "All checks passed" in output(run)
    write("pyproject.toml", """
        [tool.memlint]
        models = ["empty.py"]
    """)
    run = memlint("check", "empty.py", cwd=tmp_path)
    text = output(run)
    assert run.code == 2
    assert "empty.py: no model found: the file is empty" in text


def test_non_utf8_source_is_an_e902_finding_at_the_byte(tmp_path):
    path = tmp_path / "legacy.py"
    path.write_bytes(b"import torch\nname = '\xe9t\xe9'\n")
    run = memlint("check", str(path))
    text = output(run)
    assert run.code == 1
    assert "legacy.py:2:9: E902 is not valid utf-8 (byte 0xe9" in text and "coding" in text
    # With a PEP 263 declaration the same bytes are valid Python, and memlint reads them.
    path.write_bytes(b"# -*- coding: latin-1 -*-\nimport torch\nname = '\xe9t\xe9'\n")
    run = memlint("check", str(path))
    assert run.code == 0 and "All checks passed" in output(run)


def test_binary_file_is_an_e902_finding(tmp_path):
    path = tmp_path / "weights.py"
    path.write_bytes(bytes(range(256)) * 8)
    run = memlint("check", str(path))
    text = output(run)
    assert run.code == 1
    assert "weights.py:1:1: E902 is not a Python source file: it contains NUL bytes" in text


def test_text_file_passed_explicitly_is_an_e902_finding(write):
    path = write("notes.txt", "Remember to lower the batch size.\n")
    run = memlint("check", str(path))
    text = output(run)
    assert run.code == 1
    assert "notes.txt:1:1: E902 is not a Python file (.txt)" in text


def test_debug_shows_the_traceback(write):
    path = write("model.py", MODEL + "\nraise RuntimeError('no GPU here')\n")
    run = memlint("check", str(path), "--input-shape", "64", "--debug")
    assert run.code == 2
    assert "Traceback" in run.err and "no GPU here" in run.err
