"""PREC001/PREC002 static detection, the PERF001 cost model and its constants, and torch-free rule imports.

The model side of these rules (and PERF001, PREC003) runs through the real pipeline in
test_model_rule_examples.py.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from memlint import fftcost
from memlint.rules.base import RuleContext, all_rules, get_rule
from memlint.settings import Settings
from memlint.targets import resolve_target

GPU_RECORDS = REPO.parent / "shared" / "calibration" / "h200_public.json"
CPU_RECORDS = REPO / "benchmarks" / "measurements" / "cpu_fft.json"


def run(code: str, source: str, target: str | None = "gtx1050ti") -> list[str]:
    rule = get_rule(code)
    assert rule is not None
    ctx = RuleContext(path="example.py", source=textwrap.dedent(source), settings=Settings(),
                      target=resolve_target(target) if target else None)
    return [f"{d.line}:{d.message}" for d in rule().check(ctx)]


def test_importing_every_rule_does_not_import_torch():
    script = ("import sys\nfrom memlint.rules.base import all_rules\nrules = all_rules()\n"
              "assert len(rules) >= 4, rules\n"
              "print(sorted(name for name in sys.modules if name == 'torch' or name.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing the rules imported torch modules: {done.stdout}"


@pytest.mark.parametrize("code", ["PREC001", "PREC002"])
def test_static_examples_with_the_default_settings(code: str):
    """The examples hold statically too (default target gtx1050ti, no model), with or without ctx.target."""
    rule = get_rule(code)
    for target in ("gtx1050ti", None):
        for source in rule.VALID:
            assert not run(code, source, target), source
        for source in rule.INVALID:
            assert run(code, source, target), source


@pytest.mark.parametrize("source,dtype", [
    ("import torch\nwith torch.autocast('cuda', dtype=torch.bfloat16):\n    pass\n", "bf16"),
    ("import torch\nwith torch.autocast(device_type='cuda'):\n    pass\n", "fp16"),
    ("import torch\nwith torch.amp.autocast('cuda', torch.bfloat16):\n    pass\n", "bf16"),
    ("from torch import autocast, bfloat16 as bf\nwith autocast('cuda', dtype=bf):\n    pass\n", "bf16"),
    ("import torch as T\nmodel = make()\nmodel = model.to('cuda', T.bfloat16)\n", "bf16"),
    ("import torch\nself_net = build()\nself_net.half()\n", "fp16"),
    ("import torch\nclass A:\n    def f(self):\n        self.backbone.to(dtype=torch.float16)\n", "fp16"),
    ("import torch\ntorch.set_default_dtype(torch.bfloat16)\n", "bf16"),
    ("from accelerate import Accelerator\nacc = Accelerator(mixed_precision='fp16')\n", "fp16"),
    ("import pytorch_lightning as pl\npl.Trainer(precision=16)\n", "fp16"),
])
def test_prec001_finds_precision_choices(source: str, dtype: str):
    [finding] = run("PREC001", source)
    assert f" {dtype}, which gtx1050ti does not run natively" in finding


@pytest.mark.parametrize("source", [
    # tensors, not models
    "import torch\nx = torch.randn(3)\ny = x.half()\nz = x.to(torch.bfloat16)\n",
    "import torch\nhidden_states = hidden_states.to(torch.float16)\n",
    # autocast off, or for another device, or with a dtype memlint cannot read
    "import torch\nwith torch.autocast('cuda', dtype=torch.float16, enabled=False):\n    pass\n",
    "import torch\nwith torch.cuda.amp.autocast(False):\n    pass\n",
    "import torch\nwith torch.autocast('cpu'):\n    pass\n",
    "import torch\nwith torch.autocast(device_type=device_type, dtype=dtype):\n    pass\n",
    "import torch\nwith torch.autocast(device_type=device_type):\n    pass\n",
    # not torch
    "import mylib\nmodel = mylib.Model()\nmodel.to(mylib.bfloat16)\n",
    "import lightning as L\nL.Trainer(precision='32-true')\n",
    # a buffer is not a model (transformers' Reformer: mask values cast for fp16 inputs)
    "import torch\nfrom torch import nn\nself.mask_value_float16 = nn.Buffer(torch.tensor(-1e4))\n"
    "mask_value = self.mask_value_float16.half()\n",
])
def test_prec001_stays_silent(source: str):
    assert not run("PREC001", source)


def test_prec001_conditional_autocast_is_an_info():
    rule = get_rule("PREC001")
    source = "import torch\nwith torch.autocast(device_type='cuda', dtype=torch.bfloat16, enabled=use_amp):\n    pass\n"
    ctx = RuleContext(path="example.py", source=source, settings=Settings(), target=resolve_target("gtx1050ti"))
    [finding] = rule().check(ctx)
    assert finding.severity.value == "info" and "bf16 when enabled=use_amp" in finding.message


def test_prec001_names_native_choices_and_respects_the_target():
    source = "import torch\nmodel = Net()\nmodel = model.to(torch.bfloat16)\n"
    [t4] = run("PREC001", source, "t4")
    assert "native on t4: fp32, fp16" in t4 and "compute capability 7.5" in t4
    assert not run("PREC001", source, "a100-80gb")
    assert not run("PREC001", source, "mem:8GiB")        # a bare capacity: no hardware to judge
    assert not run("PREC001", source, "cpu:16GiB")       # a generic host: its CPU is unknown
    [xeon] = run("PREC001", source, "xeon-platinum-8180:64GiB")
    assert "no bf16 arithmetic" in xeon
    [fp64] = run("PREC001", "import torch\nmodel = Net().double()\n", "rtx3090")
    assert "1/64 of fp32" in fp64


@pytest.mark.parametrize("source", [
    "import torch\ntorch.set_default_tensor_type(torch.DoubleTensor)\n",
    "import torch\nmodel = AutoModel.from_pretrained('x', torch_dtype=torch.float64)\n",
    "import torch\nnet = Net()\nnet = net.to(torch.double)\n",
    "import lightning\ntrainer = lightning.Trainer(precision='64-true')\n",
    "import torch\ndef example_inputs(batch_size):\n    return torch.randn(batch_size, 3).double()\n",
])
def test_prec002_finds_float64(source: str):
    assert len(run("PREC002", source)) == 1


@pytest.mark.parametrize("source", [
    "import torch\ncumulative = torch.cumsum(x.double(), 0)\n",
    "import torch\ntable = torch.arange(10, dtype=torch.float64)\n",
    "import torch\nclass M(torch.nn.Module):\n    def forward(self, x):\n        return x.to(torch.float64).sum().float()\n",
    "import torch\nself.register_buffer('freqs', torch.arange(8, dtype=torch.float64))\n",
])
def test_prec002_stays_silent_on_local_float64(source: str):
    assert not run("PREC002", source)


def test_prec002_is_silent_on_cpu_targets_and_says_mps_has_no_float64():
    source = "import torch\nmodel = Net().double()\n"
    assert not run("PREC002", source, "cpu:16GiB")
    [mps] = run("PREC002", source, "apple-m2:16GiB")
    assert "MPS has no float64" in mps


def test_rules_are_documented():
    for code in ("PERF001", "PREC001", "PREC002", "PREC003"):
        rule = get_rule(code)
        assert rule is not None and rule.VALID and rule.INVALID
        text = rule.explain()
        assert "## What it does" in text and "## Use instead" in text and code in text
    assert {rule.code for rule in all_rules()} >= {"PERF001", "PREC001", "PREC002", "PREC003"}


# ----------------------------------------------------------------------------------------------
# PERF001's cost model
# ----------------------------------------------------------------------------------------------

def test_fft_sizes_have_no_prime_factor_above_5():
    assert [fftcost.fast_size(n) for n in (1, 64, 94, 148, 158, 188, 286)] == [1, 64, 96, 150, 160, 192, 288]


def test_cost_model_counts():
    shape = fftcost.ConvShape(n=2, c_in=3, c_out=4, h=10, w=12, kh=3, kw=5, pad_h=1, pad_w=2)
    assert (shape.h_out, shape.w_out) == (10, 12)
    assert shape.fft_size == (15, 20)  # 10 + 2 + 3 - 1 = 14 -> 15; 12 + 4 + 5 - 1 = 20
    assert shape.spectrum_points == 15 * 11
    assert fftcost.direct_flops(shape) == 2 * 2 * 4 * 3 * 10 * 12 * 3 * 5
    parts = fftcost.fft_flops_parts(shape)
    assert parts["product"] == 8 * 2 * 4 * 3 * 165
    per_plane = 2.5 * 15 * 20 * math.log2(15 * 20)
    assert parts["input_fft"] == pytest.approx(2 * 3 * per_plane)
    assert parts["kernel_fft"] == pytest.approx(4 * 3 * per_plane)
    assert parts["inverse_fft"] == pytest.approx(2 * 4 * per_plane)
    assert fftcost.spectrum_bytes(shape) == {"input": 2 * 3 * 165 * 8, "kernel": 4 * 3 * 165 * 8,
                                             "output": 2 * 4 * 165 * 8}
    # larger kernels favour the Fourier domain
    small, large = (fftcost.ConvShape(8, 32, 32, 128, 128, k, k) for k in (3, 31))
    assert fftcost.predicted_speedup(large, "cpu") > 10 * fftcost.predicted_speedup(small, "cpu")


def test_fftcost_does_not_import_torch():
    done = subprocess.run([sys.executable, "-c", "import sys, memlint.fftcost; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("device,path", [("gpu", GPU_RECORDS), ("cpu", CPU_RECORDS)])
def test_shipped_constants_are_the_fit_of_the_measurements(device: str, path: Path):
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    records = json.loads(path.read_text())["fft"]
    assert {"N", "C", "HW", "k", "direct_s", "fft_s"} <= set(records[0])
    ratio = fftcost.fit_ratio(records)
    assert fftcost.EFFICIENCY_RATIO[device] == pytest.approx(ratio, rel=0.01)
    assert fftcost.MARGIN[device] == pytest.approx(fftcost.worst_overprediction(records, ratio), rel=0.01)
    found = fftcost.predictions(records, ratio)
    # the margin is what keeps PERF001 from being wrong on any measured record
    assert all(p.measured_speedup >= 1 for p in found if p.predicted_speedup >= fftcost.MARGIN[device])
    assert sum(p.correct for p in found) >= 0.75 * len(found)
