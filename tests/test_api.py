"""`memlint.estimate`: the CLI's analysis from Python, on an instance (real weights never copied) or a callable."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import memlint
import memlint.api
from conftest import REPO, memlint as memlint_command
from memlint.errors import ModelError
from memlint.report import ModelReport

MODEL = """
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(256, 512), nn.LayerNorm(512), nn.GELU(), nn.Dropout(0.1),
                                      nn.Linear(512, 10))

        def forward(self, x):
            return self.body(x)


    def example_inputs(batch_size):
        return torch.randn(batch_size, 256)
"""
TARGET = "mem:96MiB"


class Tokens(nn.Module):
    """Keyword inputs, integer token ids, tied embedding and output weights."""

    def __init__(self, vocabulary: int = 1000, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocabulary, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.mix(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
        return self.out(hidden)


def _load(path: Path):
    spec = importlib.util.spec_from_file_location("api_test_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_an_instance_gives_the_report_the_cli_prints(tmp_path: Path):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(MODEL).lstrip())
    run = memlint_command("check", "net.py", "--target", TARGET, "--batch-size", "32", "--output-format", "json",
                          cwd=tmp_path)
    assert run.code in (0, 1), run.err
    cli = run.json()["models"][0]
    module = _load(path)
    model = module.Net()  # real weights
    report = memlint.estimate(model, module.example_inputs(32), target=TARGET)
    assert isinstance(report, ModelReport)
    for key in ("peak_allocated_bytes", "peak_device_bytes", "max_batch_size", "breakdown", "budget_bytes",
                "batch_size", "optimizer", "precision", "mode", "target"):
        assert getattr(report, key) == cli[key], key
    assert [(l.name, l.parameter_bytes, l.activation_bytes) for l in report.layers] == \
        [(l["name"], l["parameter_bytes"], l["activation_bytes"]) for l in cli["layers"]]
    assert report.timeline and report.graph  # the full report, as the worker returns it


def test_the_users_model_is_left_untouched():
    model = Tokens()
    before = {name: (param, param.detach().clone()) for name, param in model.named_parameters()}
    model.train()
    inputs = {"input_ids": torch.randint(0, 1000, (8, 32)), "attention_mask": torch.ones(8, 32)}
    report = memlint.estimate(model, inputs, target="t4", find_max_batch=False)
    assert report.batch_size == 8 and report.max_batch_size is None
    for name, param in model.named_parameters():
        original, values = before[name]
        assert param is original and torch.equal(param, values) and param.grad is None
        assert not getattr(param, "fake_mode", None)
    assert model.training
    assert model.out.weight is model.embed.weight
    # Tied weights count once: embedding 1000x64 + mix 64x64 + 64, fp32.
    assert report.breakdown["parameters"] == pytest.approx((1000 * 64 + 64 * 64 + 64) * 4, rel=0.01)


def test_a_model_on_the_meta_device_is_estimated_without_its_memory():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8192, 8192), nn.ReLU(), nn.Linear(8192, 8192))  # 512 MiB of weights
    report = memlint.estimate(model, torch.empty(4, 8192, device="meta"), target="h100-80gb", optimizer="sgd",
                              find_max_batch=False)
    weights = 2 * (8192 * 8192 + 8192) * 4
    assert report.breakdown["parameters"] == pytest.approx(weights, rel=0.01)
    assert report.breakdown["optimizer_state"] == 0  # plain SGD keeps none


def test_a_callable_model_and_callable_inputs_and_the_options():
    report = memlint.estimate(Tokens, lambda n: {"input_ids": torch.randint(0, 1000, (n, 16)),
                                                 "attention_mask": torch.ones(n, 16)},
                              target="gtx1050ti", batch_size=4, optimizer="adamw", precision="bf16-mixed",
                              threshold=0.5, find_max_batch=False)
    assert (report.name, report.batch_size, report.optimizer, report.precision, report.threshold) == \
        ("Tokens", 4, "adamw", "bf16-mixed", 0.5)
    # Built by memlint under its fake mode: the layers know where they were created (this file).
    assert report.layers[1].source and report.layers[1].source.startswith(__file__ + ":")
    inference = memlint.estimate(Tokens(), {"input_ids": torch.zeros(2, 16, dtype=torch.long),
                                            "attention_mask": torch.ones(2, 16)}, mode="infer", find_max_batch=False)
    assert inference.optimizer == "none" and inference.breakdown["gradients"] == 0


def test_a_batch_size_resizes_example_inputs():
    small = memlint.estimate(Tokens(), (torch.zeros(2, 16, dtype=torch.long), torch.ones(2, 16)),
                             batch_size=64, find_max_batch=False)
    large = memlint.estimate(Tokens(), (torch.zeros(64, 16, dtype=torch.long), torch.ones(64, 16)),
                             find_max_batch=False)
    assert small.batch_size == large.batch_size == 64
    assert small.peak_allocated_bytes == large.peak_allocated_bytes


def test_a_custom_optimizer_and_loss():
    report = memlint.estimate(nn.Linear(128, 128), torch.randn(16, 128), optimizer=lambda params: torch.optim.SGD(
        params, lr=0.1, momentum=0.9, foreach=True), loss_fn=lambda output, inputs: (output - inputs).pow(2).mean(),
        find_max_batch=False)
    assert report.optimizer == "build_optimizer"
    assert report.breakdown["optimizer_state"] == pytest.approx((128 * 128 + 128) * 4, rel=0.05)


def test_wrong_arguments_and_failing_models():
    with pytest.raises(ValueError, match="mode"):
        memlint.estimate(nn.Linear(4, 4), torch.randn(2, 4), mode="training")
    with pytest.raises(ValueError, match="optimizer"):
        memlint.estimate(nn.Linear(4, 4), torch.randn(2, 4), optimizer="lion")
    with pytest.raises(ValueError, match="batch_size"):
        memlint.estimate(nn.Linear(4, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="nn.Module"):
        memlint.estimate("resnet50", torch.randn(2, 4))
    with pytest.raises(ModelError, match="Linear.*reduction dim"):
        memlint.estimate(nn.Linear(4, 4), torch.randn(2, 5), find_max_batch=False)


def test_render_is_the_cli_table():
    report = memlint.estimate(nn.Sequential(nn.Linear(32, 32), nn.ReLU()), torch.randn(8, 32), target="t4",
                              find_max_batch=False)
    text = memlint.api.render(report)
    assert "peak allocated (torch.cuda.max_memory_allocated)" in text and "fits:" in text


def test_the_readme_example_runs(tmp_path: Path):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "largest batch size" in done.stdout
