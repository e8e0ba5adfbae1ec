"""Direct vs Fourier-domain convolution: measure the CPU crossover, fit PERF001's constants, print the table.

    python benchmarks/fft_crossover.py --measure   # time F.conv2d vs irfft2(rfft2(x) * rfft2(w)) on this CPU,
                                                   # write benchmarks/measurements/cpu_fft.json
    python benchmarks/fft_crossover.py             # fit one efficiency ratio per device class (gpu: the
                                                   # H200 `fft` records of ../shared/calibration; cpu: the
                                                   # file above) and print how well it predicts each winner
    python benchmarks/fft_crossover.py --markdown  # the same tables as README markdown

The records have the fields of the calibration set's ``fft`` entries: ``N``, ``C`` (input and output
channels), ``HW`` (square plane), ``k`` (square kernel), ``direct_s``, ``fft_s`` (seconds per call),
``rel_err`` (``||fft - direct|| / ||direct||``) and ``cudnn_benchmark`` (always false here: no cuDNN).
Both sides run on the same fp32 tensors with stride 1 and no padding. The Fourier side is the plain
PyTorch implementation a user would write (memlint.fftcost describes what the cost model counts):
``rfft2`` of the input and of the flipped kernel, zero-padded to ``(H + k - 1, W + k - 1)`` rounded up
to sizes with no prime factor above 5 (``fftcost.fast_size``), a batched
complex matmul over channels at every frequency, ``irfft2``, and the valid slice.

The machine these ran on is a shared 2-core VM, busy with other work: wall-clock times there swing
by 10x. So the benchmark runs PyTorch on one thread and times each call by the CPU time of this
process (``time.process_time``), which preemption does not inflate; each time is the minimum over
repeats, the direct and FFT calls interleaved. Both sides use the same single thread, so the ratio
(the only thing the cost model needs) is that of one core.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from memlint import fftcost  # noqa: E402  (pure Python, no torch)

CPU_FILE = HERE / "measurements" / "cpu_fft.json"
GPU_FILE = REPO.parent / "shared" / "calibration" / "h200_public.json"

KERNELS = (3, 5, 7, 9, 11, 13, 15, 17, 21, 25, 31)
PLANES = (32, 64, 96, 128)
CONFIGS = ((4, 16), (8, 32))  # (N, C): batch, channels in = channels out


def fft_conv2d(x, w):
    """``F.conv2d(x, w)`` (stride 1, no padding) computed in the Fourier domain."""
    import torch

    n, c, h, wd = x.shape
    kh, kw = w.shape[-2:]
    size = fftcost.ConvShape(n, c, w.shape[0], h, wd, kh, kw).fft_size  # (H + k - 1, W + k - 1), made 5-smooth
    xf = torch.fft.rfft2(x, s=size)                           # N, C_in, H_p, W_p/2+1
    kf = torch.fft.rfft2(torch.flip(w, (-2, -1)), s=size)     # C_out, C_in, H_p, W_p/2+1
    yf = torch.matmul(xf.permute(2, 3, 0, 1), kf.permute(2, 3, 1, 0))  # H_p, W_p/2+1, N, C_out
    y = torch.fft.irfft2(yf.permute(2, 3, 0, 1), s=size)
    return y[..., kh - 1:h, kw - 1:wd]


def measure(repeats: int, budget_s: float) -> list[dict]:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    torch.set_num_threads(1)
    records = []
    for n, c in CONFIGS:
        for hw in PLANES:
            for k in KERNELS:
                if k >= hw:
                    continue
                x = torch.randn(n, c, hw, hw)
                w = torch.randn(c, c, k, k) / math.sqrt(c * k * k)
                with torch.no_grad():
                    reference = F.conv2d(x, w)  # also the warm-up
                    result = fft_conv2d(x, w)
                    rel_err = float((result - reference).norm() / reference.norm())
                    direct, fft = [], []
                    started = time.perf_counter()
                    while len(direct) < repeats and (len(direct) < 2 or time.perf_counter() - started < budget_s):
                        t0 = time.process_time()
                        F.conv2d(x, w)
                        t1 = time.process_time()
                        fft_conv2d(x, w)
                        t2 = time.process_time()
                        direct.append(t1 - t0)
                        fft.append(t2 - t1)
                record = {"N": n, "C": c, "HW": hw, "k": k, "cudnn_benchmark": False,
                          "direct_s": min(direct), "fft_s": min(fft), "rel_err": rel_err, "repeats": len(direct)}
                records.append(record)
                print(f"N={n:<2} C={c:<3} HW={hw:<4} k={k:<3} direct {record['direct_s']:.3e} s  "
                      f"fft {record['fft_s']:.3e} s  speed-up of fft {record['direct_s'] / record['fft_s']:.2f}",
                      flush=True)
    return records


def machine() -> dict:
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "torch": torch.__version__, "python": platform.python_version(),
            "timer": "time.process_time, one thread, minimum over repeats, direct and FFT interleaved"}


def load(path: Path) -> list[dict]:
    return list(json.loads(path.read_text())["fft"]) if path.is_file() else []


def table(name: str, records: list[dict], ratio: float, markdown: bool) -> tuple[int, int, float, float]:
    """Print one device class's winner-prediction table; return (correct, total, rms log error, worst over-prediction)."""
    found = fftcost.predictions(records, ratio)
    residuals = [math.log(p.predicted_speedup / p.measured_speedup) for p in found]
    rms = math.sqrt(sum(r * r for r in residuals) / len(residuals))
    worst = math.exp(max(residuals))
    correct = sum(p.correct for p in found)
    if markdown:
        print(f"\n**{name}** (efficiency ratio {ratio:.4g}, margin {worst:.3g}): the winner is predicted on {correct} "
              f"of {len(found)} records; rms error of log(speed-up) {rms:.2f}.\n")
        matrix(found)
        return correct, len(found), rms, worst
    print(f"\n{name}: efficiency ratio {ratio:.4g}")
    print(f"{'N':>3}{'C':>5}{'HW':>5}{'k':>4}{'direct ms':>11}{'fft ms':>10}{'measured':>10}{'predicted':>11}  winner")
    for p in found:
        r = p.record
        mark = "" if p.correct else "  <- missed"
        print(f"{r['N']:>3}{r['C']:>5}{r['HW']:>5}{r['k']:>4}{1e3 * r['direct_s']:>11.3f}{1e3 * r['fft_s']:>10.3f}"
              f"{p.measured_speedup:>10.2f}{p.predicted_speedup:>11.2f}  {p.measured_winner}/{p.predicted_winner}{mark}")
    print(f"{name}: winner predicted on {correct} of {len(found)} records; rms error of log(speed-up) {rms:.2f}; "
          f"largest over-prediction of the FFT's speed-up x{worst:.2f}")
    return correct, len(found), rms, worst


def matrix(found: list[fftcost.Prediction]) -> None:
    """One markdown row per (N, C, HW[, cudnn.benchmark]), one column per kernel size: measured / predicted
    speed-up of the FFT; bold where the FFT measured faster, (x) where the predicted winner is wrong."""
    kernels = sorted({int(p.record["k"]) for p in found})
    rows: dict[tuple, dict[int, fftcost.Prediction]] = {}
    benchmark_varies = len({bool(p.record.get("cudnn_benchmark")) for p in found}) > 1
    for p in found:
        r = p.record
        key = (r["N"], r["C"], r["HW"]) + ((bool(r.get("cudnn_benchmark")),) if benchmark_varies else ())
        rows.setdefault(key, {})[int(r["k"])] = p
    head = "| N, C, HW" + (", cudnn.benchmark" if benchmark_varies else "") + " | " + \
        " | ".join(f"k={k}" for k in kernels) + " |"
    print(head)
    print("|" + " --- |" * (len(kernels) + 1))
    for key, cells in rows.items():
        label = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in key)
        texts = []
        for k in kernels:
            p = cells.get(k)
            if p is None:
                texts.append("")
                continue
            text = f"{p.measured_speedup:.2f} / {p.predicted_speedup:.2f}"
            text = f"**{text}**" if p.measured_winner == "fft" else text
            texts.append(text + ("" if p.correct else " (x)"))
        print(f"| {label} | " + " | ".join(texts) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="time this CPU and write " + str(CPU_FILE.relative_to(REPO)))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per record before fewer repeats suffice")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--gpu-file", type=Path, default=GPU_FILE)
    args = parser.parse_args(argv)

    if args.measure:
        records = measure(args.repeats, args.budget)
        CPU_FILE.parent.mkdir(parents=True, exist_ok=True)
        CPU_FILE.write_text(json.dumps({"machine": machine(), "fft": records}, indent=1) + "\n")
        print(f"wrote {CPU_FILE.relative_to(REPO)} ({len(records)} records)")

    status = 0
    for name, records in (("gpu", load(args.gpu_file)), ("cpu", load(CPU_FILE))):
        if not records:
            print(f"\n{name}: no measurements found", file=sys.stderr)
            continue
        ratio = fftcost.fit_ratio(records)
        table(name, records, ratio, args.markdown)
        margin = fftcost.worst_overprediction(records, ratio)
        print(f"{name}: EFFICIENCY_RATIO = {ratio:.4g}, MARGIN = {margin:.4g}")
        for label, shipped, fitted in (("EFFICIENCY_RATIO", fftcost.EFFICIENCY_RATIO.get(name, 0.0), ratio),
                                       ("MARGIN", fftcost.MARGIN.get(name, 0.0), margin)):
            if not shipped or abs(math.log(shipped / fitted)) > 0.01:
                print(f"{name}: memlint/fftcost.py ships {label}[{name!r}] = {shipped:.4g}, the measurements give "
                      f"{fitted:.4g}: update it", file=sys.stderr)
                status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
