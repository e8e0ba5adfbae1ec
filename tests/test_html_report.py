"""`memlint report`: the self-contained HTML page, rendered for real in headless Chromium."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import memlint

MODEL = """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                          nn.ReLU(), nn.AdaptiveAvgPool2d(4))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(512, 10))

        def forward(self, x):
            return self.head(self.features(x))


    def example_inputs(batch_size):
        return torch.randn(batch_size, 3, 64, 64)
"""
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((found for found in map(shutil.which, BROWSERS) if found), None)


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("report")
    (folder / "net.py").write_text(textwrap.dedent(MODEL).lstrip())
    run = memlint("report", "net.py", "--target", "mem:512MiB", "--batch-size", "64", "-o", "report.html", cwd=folder)
    assert run.code == 0, run.err
    assert "wrote report.html (Net on mem:512MiB)" in run.out
    return folder / "report.html"


def test_the_page_is_self_contained(page: Path):
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"<script[^>]+src=", text)  # plotly.js is embedded, nothing is fetched
    assert "Plotly.newPlot" in text and len(text) > 1_000_000
    assert "Net on mem:512MiB" in text


def _chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="memlint-chromium-")
    try:
        return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--no-first-run", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
                               *args], cwd=cwd, capture_output=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (.ci/run installs Debian's `chromium` as root)")
def test_chromium_renders_the_peak_the_budget_and_the_layers(page: Path):
    dom = _chromium("--dump-dom", page.as_uri(), cwd=page.parent)
    assert dom.returncode == 0, dom.stderr.decode(errors="replace")[-2000:]
    rendered = dom.stdout.decode("utf-8", errors="replace")
    # Plotly draws annotations as SVG <text class="annotation-text">: present only once the script ran.
    annotations = re.findall(r'<text[^>]*class="annotation-text[^"]*"[^>]*>(.*?)</text>', rendered)
    assert any(text.startswith("peak ") for text in annotations), annotations
    assert any(text.startswith("budget ") and "mem:512MiB" in text for text in annotations), annotations
    assert any(text == "backward" for text in annotations), annotations  # the phases are named
    assert "features.0 (Conv2d)" in rendered  # the per-layer bars' axis labels
    assert rendered.count('class="main-svg"') >= 4  # two figures (plotly draws two SVG layers each)


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="Chromium is not installed (.ci/run installs Debian's `chromium` as root)")
def test_chromium_screenshot_is_a_real_picture(page: Path):
    from PIL import Image

    shot = page.parent / "shot.png"
    done = _chromium("--screenshot=" + str(shot), "--window-size=1400,1000", page.as_uri(), cwd=page.parent)
    assert done.returncode == 0 and shot.is_file(), done.stderr.decode(errors="replace")[-2000:]
    assert shot.stat().st_size > 20_000
    with Image.open(shot) as image:
        assert image.size == (1400, 1000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # text, stacked areas, lines: not a blank page
    (count, most_common), *_ = sorted(colours, reverse=True)
    assert count < 0.9 * 1400 * 1000, most_common


def test_report_without_plotly_says_how_to_install_it(tmp_path: Path):
    (tmp_path / "net.py").write_text(textwrap.dedent(MODEL).lstrip())
    script = textwrap.dedent("""
        import sys

        class NoPlotly:
            def find_spec(self, name, path=None, target=None):
                if name == "plotly" or name.startswith("plotly."):
                    raise ImportError("no plotly")

        sys.meta_path.insert(0, NoPlotly())
        from memlint.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    done = subprocess.run([sys.executable, "-c", script, "report", "net.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "memlint[report]" in done.stderr and "Traceback" not in done.stderr


def test_report_needs_a_file(tmp_path: Path):
    run = memlint("report", "missing.py", cwd=tmp_path)
    assert run.code == 2 and "no such file" in run.err
