"""The analysis cache: an unchanged model is answered without a new analysis, and any change to
what the analysis read (the file, a module it imports, a file it opens, an environment variable it
looks up, the request) makes memlint analyse it again. Real analyses in real child processes; the
model file counts its imports in a log outside its folder."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from memlint.cache import AnalysisCache
from memlint.engine import run_check
from memlint.settings import Settings

MODEL = """
    import json
    import os
    import pathlib

    import torch
    from torch import nn

    import helper

    HERE = pathlib.Path(__file__).parent
    WIDTH = int(os.environ.get("CACHE_TEST_WIDTH", "8")) * json.loads((HERE / "config.json").read_text())["scale"]
    with open(os.environ["CACHE_TEST_LOG"], "a") as log:  # written, not read: not an input
        log.write("imported\\n")


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(WIDTH, helper.HIDDEN), nn.ReLU(), nn.Linear(helper.HIDDEN, 10))

        def forward(self, x):
            return self.layers(x)


    def example_inputs(batch_size):
        return torch.randn(batch_size, WIDTH)
"""


def _settle(*paths: Path) -> None:
    """Date the files in the past: a file modified just before an analysis is not trusted for the cache."""
    past = time.time() - 60
    for path in paths:
        os.utime(path, (past, past))
        past += 1  # each rewrite of a file gets a time of its own


@pytest.fixture
def project(tmp_path: Path, write, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MEMLINT_NO_CACHE")
    monkeypatch.setenv("MEMLINT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CACHE_TEST_LOG", str(tmp_path / "log.txt"))
    monkeypatch.delenv("CACHE_TEST_WIDTH", raising=False)
    model = write("project/model.py", MODEL)
    helper = write("project/helper.py", "HIDDEN = 16\n")
    config = write("project/config.json", '{"scale": 1}\n')
    _settle(model, helper, config, model.parent)
    return model


def _check(model: Path, **settings) -> tuple[int, int, list[dict]]:
    """(analyses so far, parameters of the model, the reports' JSON)."""
    result = run_check([str(model)], Settings(targets=("mem:4GiB",), **settings), model.parent)
    assert not result.errors, [error.render() for error in result.errors]
    log = Path(os.environ["CACHE_TEST_LOG"])
    analyses = len(log.read_text().splitlines()) if log.exists() else 0
    parameters = result.reports[0].parameter_dtypes["float32"] // 4
    return analyses, parameters, [report.to_json(full=True) for report in result.reports]


def _parameters(width: int, hidden: int) -> int:
    return width * hidden + hidden + hidden * 10 + 10


def test_an_unchanged_model_is_answered_from_the_cache_until_something_it_read_changes(project: Path, monkeypatch):
    analyses, parameters, first = _check(project)
    assert (analyses, parameters) == (1, _parameters(8, 16))
    analyses, _, again = _check(project)
    assert analyses == 1 and again == first  # answered from the cache, the same reports

    helper = project.with_name("helper.py")
    helper.write_text("HIDDEN = 32\n")  # a local module the model imports
    _settle(helper)
    assert _check(project)[:2] == (2, _parameters(8, 32))

    config = project.with_name("config.json")
    config.write_text('{"scale": 2}\n')  # a file the model opens
    _settle(config)
    assert _check(project)[:2] == (3, _parameters(16, 32))

    monkeypatch.setenv("CACHE_TEST_WIDTH", "4")  # an environment variable the model looks up
    assert _check(project)[:2] == (4, _parameters(8, 32))
    assert _check(project)[:2] == (4, _parameters(8, 32))

    assert _check(project, batch_size=7)[0] == 5  # another request
    assert _check(project, cache=False)[0] == 6  # --no-cache
    monkeypatch.setenv("MEMLINT_NO_CACHE", "1")
    assert _check(project)[0] == 7


def test_a_failed_analysis_is_not_kept(project: Path):
    project.write_text(project.read_text().replace("super().__init__()", "super().__init__(); raise ValueError('no')"))
    _settle(project)
    for _ in range(2):
        result = run_check([str(project)], Settings(targets=("mem:4GiB",)), project.parent)
        assert result.errors and "no" in result.errors[0].render()
    assert not list(Path(os.environ["MEMLINT_CACHE_DIR"]).glob("*.json"))


REQUEST = {"path": "m.py", "display_path": "m.py", "target": "mem:4GiB", "settings": {"timeout": 60.0},
           "batch_size": 8, "batch_size_source": None, "debug": False}


def test_a_kept_answer_needs_every_recorded_file_unchanged(tmp_path: Path, monkeypatch):
    cache = AnalysisCache(tmp_path / "cache")
    read = tmp_path / "read.py"
    read.write_text("A = 1\n")
    _settle(read)
    missing = tmp_path / "not-there.py"
    stamps = {str(read): [read.stat().st_size, read.stat().st_mtime_ns], str(missing): None}
    cache.store(REQUEST, {"reports": [{"name": "Net"}]}, {"files": stamps, "environment": {"CACHE_TEST_X": None}})

    assert cache.lookup(REQUEST) == {"reports": [{"name": "Net"}]}
    assert cache.lookup({**REQUEST, "debug": True, "settings": {"timeout": 5.0}}) is not None  # not in the key
    assert cache.lookup({**REQUEST, "batch_size": 9}) is None
    monkeypatch.setenv("CACHE_TEST_X", "1")
    assert cache.lookup(REQUEST) is None
    monkeypatch.delenv("CACHE_TEST_X")
    missing.write_text("")  # a module that was not found at the time now exists
    assert cache.lookup(REQUEST) is None
    missing.unlink()
    read.write_text("A = 2\n")  # same size, new time
    assert cache.lookup(REQUEST) is None


def test_a_broken_cache_is_skipped(tmp_path: Path):
    cache = AnalysisCache(tmp_path / "cache")
    cache.store(REQUEST, {"reports": []}, {"files": {}, "environment": {}})
    entry = next((tmp_path / "cache").glob("*.json"))
    entry.write_text(json.dumps({"inputs": {"files": {}}}))  # no answer: an older or torn entry
    assert cache.lookup(REQUEST) is None
    entry.write_text("{")
    assert cache.lookup(REQUEST) is None

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    AnalysisCache(blocked / "cache").store(REQUEST, {"reports": []}, {"files": {}, "environment": {}})  # no error
    assert AnalysisCache(blocked / "cache").lookup(REQUEST) is None


def test_only_the_most_recently_used_entries_are_kept(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("memlint.cache.MAX_ENTRIES", 3)
    cache = AnalysisCache(tmp_path / "cache")
    for batch in range(5):
        cache.store({**REQUEST, "batch_size": batch}, {"reports": [batch]}, {"files": {}, "environment": {}})
        time.sleep(0.01)
    assert [cache.lookup({**REQUEST, "batch_size": batch}) for batch in range(5)] == [
        None, None, {"reports": [2]}, {"reports": [3]}, {"reports": [4]}]
