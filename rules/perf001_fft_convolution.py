"""PERF001: a convolution that would run clearly faster in the Fourier domain."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from memlint import fftcost
from memlint.diagnostics import Diagnostic, Severity
from memlint.rules.base import Rule, RuleContext
from memlint.units import format_bytes

DEVICE_CLASS = {"gpu": "gpu", "cpu": "cpu"}  # unified memory (MPS): no measurements, no finding
MEASURED_ON = {"gpu": "an H200 (cuDNN)", "cpu": "a 2-core AMD EPYC (oneDNN, one thread)"}


def conv_shape(attributes: dict[str, Any], output_shapes: list[list[int]]) -> fftcost.ConvShape | None:
    """The traced 2-D convolution as a ConvShape, when it is one the Fourier domain can compute as is."""
    input_shape = attributes.get("input_shape")
    weight = attributes.get("weight_shape")
    if not input_shape or not weight or len(input_shape) != 4 or len(weight) != 4:
        return None
    if attributes.get("transposed") or attributes.get("groups", 1) != 1:
        return None
    if any(s != 1 for s in attributes.get("stride", [1, 1])) or any(d != 1 for d in attributes.get("dilation", [1, 1])):
        return None
    n, c_in, h, w = input_shape
    c_out, _, kh, kw = weight
    padding = attributes.get("padding", [0, 0])
    if padding == "valid":
        padding = [0, 0]
    elif padding == "same":
        if (kh - 1) % 2 or (kw - 1) % 2:
            return None  # asymmetric padding: leave it
        padding = [(kh - 1) // 2, (kw - 1) // 2]
    if isinstance(padding, str) or len(padding) != 2:
        return None
    shape = fftcost.ConvShape(n=n, c_in=c_in, c_out=c_out, h=h, w=w, kh=kh, kw=kw, pad_h=padding[0], pad_w=padding[1])
    if shape.h_out <= 0 or shape.w_out <= 0:
        return None
    if output_shapes and output_shapes[0][-2:] != [shape.h_out, shape.w_out]:
        return None  # the trace disagrees with the arithmetic: stay silent
    return shape


def site_line(site: str | None, path: str) -> int | None:
    """The line of ``file:line`` when the file is the one being checked."""
    if not site:
        return None
    filename, _, line = site.rpartition(":")
    if not line.isdigit():
        return None
    try:
        same = Path(filename).resolve() == Path(path).resolve()
    except OSError:
        same = False
    return int(line) if same or Path(filename).as_posix().endswith("/" + path) else None


class FftConvolution(Rule):
    code = "PERF001"
    name = "fft-convolution"
    summary = "A large-kernel convolution would run clearly faster in the Fourier domain"
    severity = Severity.INFO
    needs_model = True
    fix = ("compute it as irfft2(rfft2(x, s) * rfft2(w, s)) with s = (H + k - 1, W + k - 1) rounded up to sizes "
           "with no prime factor above 5, summing over input channels with a matmul per frequency "
           "(benchmarks/fft_crossover.py: fft_conv2d)")
    what = """
For every traced 2-D convolution with stride 1, dilation 1, one group and no transposition, memlint
compares two cost models on the traced shapes:

* direct: `N * C_out * C_in * H_out * W_out * k_h * k_w` multiply-adds;
* Fourier domain: real FFTs of the input and kernel planes zero-padded to `(H + k_h - 1) x (W + k_w - 1)`,
  rounded up to sizes with no prime factor above 5 (`~2.5 P log2 P` flops per plane of `P` points),
  the complex product summed over input channels
  (`N * C_out * C_in * P/2` complex multiply-adds) and the inverse FFTs of the outputs.

One efficiency ratio per device class (how many more flops per second the direct convolution gets)
is fitted to measurements: the H200 `fft` records of the calibration set for GPUs, this repository's
CPU measurements (`benchmarks/measurements/cpu_fft.json`) for CPUs. The rule reports a convolution
only when the predicted speed-up exceeds the largest factor by which the model over-predicted the
FFT's speed-up on any measurement of that device class, and on a GPU only for kernels of up to 32
(cuDNN's FFT algorithms, FFT and FFT_TILING, need stride 1 and at most 32 x 32 filters). It says the
estimated speed-up and the memory the complex spectra cost. float32 convolutions only: half
precision was not measured.
"""
    why = """
A direct convolution costs `k_h * k_w` multiply-adds per output value; in the Fourier domain the
kernel size hardly matters. For large kernels on large planes (global filters, large receptive
fields, image restoration and physics models) that is a several-fold difference in the step time.
The price is memory: complex, padded spectra of the input, kernel and output, roughly twice the
activations of the layer.
"""
    example = """
# memlint check model.py --target cpu:16GiB
self.blur = nn.Conv2d(32, 32, kernel_size=31, padding=15)   # PERF001 on 96 x 96 planes
"""
    instead = """
import scipy.fft

def fft_conv2d(x, w):              # = F.conv2d(x, w): stride 1, no padding (F.pad x first for padding=15)
    h, wd, k = x.shape[-2], x.shape[-1], w.shape[-1]
    size = [scipy.fft.next_fast_len(n, real=True) for n in (h + k - 1, wd + k - 1)]
    xf = torch.fft.rfft2(x, s=size)
    wf = torch.fft.rfft2(torch.flip(w, (-2, -1)), s=size)
    yf = torch.matmul(xf.permute(2, 3, 0, 1), wf.permute(2, 3, 1, 0)).permute(2, 3, 0, 1)
    return torch.fft.irfft2(yf, s=size)[..., k - 1:h, k - 1:wd]
"""
    VALID = (
        # small kernels: direct wins (cuDNN/oneDNN territory)
        """# memlint check --target cpu:16GiB --batch-size 8 --mode infer
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 5, padding=2))

def example_inputs(batch_size):
    return torch.randn(batch_size, 32, 128, 128)
""",
        # a 31x31 kernel, but strided: the Fourier domain cannot stride
        """# memlint check --target cpu:16GiB --batch-size 8 --mode infer
import torch
from torch import nn

def build_model():
    return nn.Conv2d(32, 32, 31, stride=2, padding=15)

def example_inputs(batch_size):
    return torch.randn(batch_size, 32, 128, 128)
""",
        # on a GPU, above cuDNN's 32 x 32 FFT tiles: never suggested
        """# memlint check --target h100-80gb --batch-size 16 --mode infer
import torch
from torch import nn

def build_model():
    return nn.Conv2d(64, 64, 63, padding=31)

def example_inputs(batch_size):
    return torch.randn(batch_size, 64, 512, 512)
""",
    )
    INVALID = (
        # a 31x31 kernel on 128 x 128 planes: the Fourier domain wins on a CPU
        """# memlint check --target cpu:16GiB --batch-size 8 --mode infer
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Conv2d(32, 32, 31, padding=15), nn.ReLU())

def example_inputs(batch_size):
    return torch.randn(batch_size, 32, 128, 128)
""",
        # a 31x31 kernel on 512 x 512 planes: the Fourier domain wins on a GPU as well
        """# memlint check --target h100-80gb --batch-size 16 --mode infer
import torch
from torch import nn

def build_model():
    return nn.Conv2d(64, 64, 31, padding=15)

def example_inputs(batch_size):
    return torch.randn(batch_size, 64, 512, 512)
""",
        # F.conv2d with the module's own 25x25 kernel, "same" padding
        """# memlint check --target cpu:16GiB --batch-size 8 --mode infer
import torch
import torch.nn.functional as F
from torch import nn

class Smooth(nn.Module):
    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(32, 32, 25, 25))

    def forward(self, x):
        return F.conv2d(x, self.kernel, padding="same")

def example_inputs(batch_size):
    return torch.randn(batch_size, 32, 128, 128)
""",
        # a branch on a tensor's value: symbolic_trace cannot follow it, and the forward's aten ops
        # are recorded, the convolution with the module that runs it
        """# memlint check --target cpu:16GiB --batch-size 8 --mode infer
import torch
from torch import nn

class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.blur = nn.Conv2d(32, 32, 31, padding=15)

    def forward(self, x):
        if x.mean() > 0:
            x = x.relu()
        return self.blur(x)

def example_inputs(batch_size):
    return torch.randn(batch_size, 32, 128, 128)
""",
    )

    def check(self, ctx: RuleContext) -> Iterable[Diagnostic]:
        model, target = ctx.model, ctx.target
        if model is None or target is None or model.precision != "fp32":
            return
        device = DEVICE_CLASS.get(target.kind)
        if device is None or not fftcost.EFFICIENCY_RATIO.get(device):
            return
        seen: set[str] = set()
        calls = 0  # functional convolutions (F.conv2d in forward): named by their order
        for node in model.graph:
            attributes = node.attributes
            if attributes.get("kind") != "conv" or attributes.get("dtype") != "float32":
                continue
            calls += 0 if node.module else 1
            shape = conv_shape(attributes, node.output_shapes)
            if shape is None or (device == "gpu" and max(shape.kh, shape.kw) > fftcost.GPU_MAX_KERNEL):
                continue
            speedup = fftcost.predicted_speedup(shape, device)
            if speedup < fftcost.MARGIN[device]:
                continue
            name = node.module or f"{node.target} call {calls}"
            if name in seen:
                continue
            seen.add(name)
            yield self._diagnostic(ctx, node, name, shape, speedup, device)

    def _diagnostic(self, ctx: RuleContext, node, name: str, shape: fftcost.ConvShape, speedup: float,  # noqa: ANN001
                    device: str) -> Diagnostic:
        model, target = ctx.model, ctx.target
        assert model is not None and target is not None
        spectra = fftcost.spectrum_bytes(shape)
        extra = sum(spectra.values())
        layer = 4 * (shape.n * shape.c_in * shape.h * shape.w + shape.n * shape.c_out * shape.h_out * shape.w_out)
        hp, wp = shape.fft_size
        line = site_line(node.source, ctx.path) or model.line
        what = f"{node.module_type or 'conv'} {name}" if node.module else f"the {name} of the forward"
        message = (
            f"{what} ({shape.c_in}->{shape.c_out} channels, {shape.kh}x{shape.kw} kernel on {shape.h}x{shape.w} "
            f"planes, batch {shape.n}) would run ~{speedup:.1f}x faster in the Fourier domain on {target.name} "
            f"(at least ~{speedup / fftcost.MARGIN[device]:.1f}x allowing for the cost model's worst miss on "
            f"measurements of {MEASURED_ON[device]}): {fftcost.direct_flops(shape):.3g} flops direct vs "
            f"{fftcost.fft_flops(shape):.3g} via FFTs padded to {hp}x{wp}. It costs memory: complex64 spectra of the "
            f"input {format_bytes(spectra['input'])}, kernel {format_bytes(spectra['kernel'])} and output "
            f"{format_bytes(spectra['output'])}, ~{format_bytes(extra)} more, against {format_bytes(layer)} for the "
            f"layer's input and output ({extra / layer:.1f}x)")
        return ctx.diagnostic(self, line, 1, message)
