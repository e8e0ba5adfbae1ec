"""Cost of a 2-D convolution computed directly vs in the Fourier domain (PERF001 and its benchmark).

Pure Python, no torch: the rule reads traced shapes from the report, and
``benchmarks/fft_crossover.py`` fits and checks the constants below against measurements.

The model counts floating-point operations on each side and lets one fitted number per device
class, :data:`EFFICIENCY_RATIO`, say how much faster a direct-convolution flop runs than an FFT
flop on that class of device:

* direct: ``N * C_out * C_in/groups * H_out * W_out * k_h * k_w`` multiply-adds (2 flops each);
* Fourier domain, with every plane zero-padded to the FFT size ``H_p x W_p``, where ``H_p`` is the
  smallest number with no prime factor above 5 that is at least ``H + 2 pad_h + k_h - 1`` (the full
  linear convolution, so no circular wrap-around; FFT libraries are several times slower on sizes
  with a large prime factor, such as 94 = 2 x 47: see benchmarks/measurements/cpu_fft_unpadded.json):

  - forward real FFTs of the ``N * C_in`` input planes and the ``C_out * C_in`` kernel planes,
    ``FFT_FLOPS_PER_POINT * P * log2 P`` flops each (``P = H_p * W_p``; 2.5 is the textbook
    count of a real FFT, half of a complex one's ``5 P log2 P``),
  - the pointwise complex product summed over input channels,
    ``N * C_out * C_in * H_p * (W_p // 2 + 1)`` complex multiply-adds of 8 flops,
  - the inverse real FFTs of the ``N * C_out`` output planes.

Predicted time ratio ``t_fft / t_direct = EFFICIENCY_RATIO[class] * fft_flops / direct_flops``;
the Fourier domain wins when it is under 1. The ratio is fitted jointly on every measurement of
a device class by least squares on ``log(t_fft / t_direct)`` (:func:`fit_ratio`): with one free
parameter that is the geometric mean of ``measured / modelled``. Refit with
``python benchmarks/fft_crossover.py --fit``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

FFT_FLOPS_PER_POINT = 2.5  # real-to-complex FFT: ~2.5 P log2 P flops
COMPLEX_MAC_FLOPS = 8      # (a+bi)(c+di) accumulated: 4 multiplies, 4 adds

# How many times more flops per second the direct convolution achieves than the FFT pipeline.
# gpu: fitted on the 48 `fft` records of shared/calibration/h200_public.json (H200, cuDNN 9.19,
#      fp32 with TF32 allowed, the PyTorch default for convolutions).
# cpu: fitted on benchmarks/measurements/cpu_fft.json (this repository's CPU measurements).
EFFICIENCY_RATIO: dict[str, float] = {"gpu": 35.827, "cpu": 16.29}

# The rule reports a convolution only when its predicted speed-up is at least this: the largest factor by
# which the fitted model over-predicted the FFT's speed-up on any measurement of the class
# (:func:`worst_overprediction`), so that no measured record would have been reported wrongly.
MARGIN: dict[str, float] = {"gpu": 2.668, "cpu": 1.852}

# cuDNN's FFT algorithms (CUDNN_CONVOLUTION_FWD_ALGO_FFT / _FFT_TILING) take stride 1 and filters
# up to 32 x 32: on a GPU memlint never suggests the Fourier domain above that.
GPU_MAX_KERNEL = 32


def fast_size(n: int) -> int:
    """The smallest ``m >= n`` whose prime factors are all 2, 3 or 5: a size every FFT library does fast."""
    m = max(1, n)
    while True:
        rest = m
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return m
        m += 1


@dataclass(frozen=True)
class ConvShape:
    """A 2-D convolution as traced: batch, channels, input plane, kernel, symmetric zero padding."""

    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    kh: int
    kw: int
    pad_h: int = 0
    pad_w: int = 0
    groups: int = 1

    @property
    def h_out(self) -> int:
        return self.h + 2 * self.pad_h - self.kh + 1

    @property
    def w_out(self) -> int:
        return self.w + 2 * self.pad_w - self.kw + 1

    @property
    def fft_size(self) -> tuple[int, int]:
        return fast_size(self.h + 2 * self.pad_h + self.kh - 1), fast_size(self.w + 2 * self.pad_w + self.kw - 1)

    @property
    def spectrum_points(self) -> int:
        """Complex values of one padded plane's real FFT: ``H_p * (W_p // 2 + 1)``."""
        hp, wp = self.fft_size
        return hp * (wp // 2 + 1)


def direct_flops(shape: ConvShape) -> float:
    return 2.0 * shape.n * shape.c_out * (shape.c_in / shape.groups) * shape.h_out * shape.w_out * shape.kh * shape.kw


def fft_flops_parts(shape: ConvShape) -> dict[str, float]:
    """Flops of each stage of the Fourier-domain convolution."""
    hp, wp = shape.fft_size
    points = hp * wp
    per_plane = FFT_FLOPS_PER_POINT * points * math.log2(points)
    return {
        "input_fft": shape.n * shape.c_in * per_plane,
        "kernel_fft": shape.c_out * shape.c_in * per_plane,
        "product": COMPLEX_MAC_FLOPS * shape.n * shape.c_out * shape.c_in * shape.spectrum_points,
        "inverse_fft": shape.n * shape.c_out * per_plane,
    }


def fft_flops(shape: ConvShape) -> float:
    return sum(fft_flops_parts(shape).values())


def flop_ratio(shape: ConvShape) -> float:
    """``fft_flops / direct_flops``: the Fourier side's work relative to the direct side's."""
    return fft_flops(shape) / direct_flops(shape)


def predicted_time_ratio(shape: ConvShape, device_class: str, ratio: float | None = None) -> float:
    """Predicted ``t_fft / t_direct`` on a device class (``gpu`` or ``cpu``)."""
    rho = EFFICIENCY_RATIO[device_class] if ratio is None else ratio
    return rho * flop_ratio(shape)


def predicted_speedup(shape: ConvShape, device_class: str, ratio: float | None = None) -> float:
    """Predicted ``t_direct / t_fft``: above 1, the Fourier domain is faster."""
    return 1.0 / predicted_time_ratio(shape, device_class, ratio)


def spectrum_bytes(shape: ConvShape, complex_bytes: int = 8) -> dict[str, int]:
    """Bytes of the Fourier-domain tensors (complex64 by default): input, kernel and output spectra."""
    points = shape.spectrum_points
    return {
        "input": shape.n * shape.c_in * points * complex_bytes,
        "kernel": shape.c_out * shape.c_in * points * complex_bytes,
        "output": shape.n * shape.c_out * points * complex_bytes,
    }


# ------------------------------------------------------------------------------------------
# Fitting against measurements (records shaped like the calibration set's `fft` entries)
# ------------------------------------------------------------------------------------------

def record_shape(record: Mapping[str, object]) -> ConvShape:
    """A measurement record (``N``, ``C``, ``HW``, ``k``: C in = C out, square planes, no padding)."""
    n, c, hw, k = (int(record[key]) for key in ("N", "C", "HW", "k"))  # type: ignore[call-overload]
    return ConvShape(n=n, c_in=c, c_out=c, h=hw, w=hw, kh=k, kw=k)


def fit_ratio(records: Iterable[Mapping[str, object]]) -> float:
    """The one efficiency ratio minimising the squared error of ``log(t_fft / t_direct)`` over all records."""
    residuals = [math.log(float(r["fft_s"]) / float(r["direct_s"])) - math.log(flop_ratio(record_shape(r)))  # type: ignore[arg-type]
                 for r in records]
    if not residuals:
        raise ValueError("no records to fit")
    return math.exp(sum(residuals) / len(residuals))


@dataclass(frozen=True)
class Prediction:
    record: Mapping[str, object]
    measured_speedup: float   # t_direct / t_fft measured
    predicted_speedup: float  # t_direct / t_fft predicted

    @property
    def measured_winner(self) -> str:
        return "fft" if self.measured_speedup > 1 else "direct"

    @property
    def predicted_winner(self) -> str:
        return "fft" if self.predicted_speedup > 1 else "direct"

    @property
    def correct(self) -> bool:
        return self.measured_winner == self.predicted_winner


def predictions(records: Iterable[Mapping[str, object]], ratio: float) -> list[Prediction]:
    return [Prediction(r, float(r["direct_s"]) / float(r["fft_s"]),  # type: ignore[arg-type]
                       1.0 / (ratio * flop_ratio(record_shape(r)))) for r in records]


def worst_overprediction(records: Iterable[Mapping[str, object]], ratio: float) -> float:
    """The largest ``predicted / measured`` speed-up over the records (at least 1)."""
    return max([1.0] + [p.predicted_speedup / p.measured_speedup for p in predictions(records, ratio)])
