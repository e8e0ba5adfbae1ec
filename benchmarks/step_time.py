"""memlint's time per step (a roofline lower bound) against step times measured on an H200.

    python benchmarks/step_time.py [--calibration ../shared/calibration] [--markdown]

The records are the ``times`` of ``h200_public_more.json``: median wall seconds of one training
step (SGD with momentum, 10 timed steps after 3 warm-ups) in fp32 and under bf16 autocast, for
AlexNet b128, ResNet-50 b64, VGG-16 b32, BERT-base b32, GPT-2 b8 and MobileNet-V2 b64, and the
``step_times`` measured the same way since (benchmarks/measurements: DenseNet-121, EfficientNet-B0,
ConvNeXt-T, ViT-B/16, a Llama-style model, OPT-125m, RoBERTa-base), built as the calibration
protocol builds them (benchmarks/workloads.py). memlint simulates the same step on
fake tensors and prints its estimate for ``--target h200``, the ratio measured / estimate (how
far reality is above the lower bound) and the share of the estimate that is compute-bound.
Needs torchvision for the image models (the benchmark environment).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import OPTIMIZERS, needs_torchvision, spec_for, torchvision_available  # noqa: E402

from memlint.estimator import Workload, analyse  # noqa: E402
from memlint.targets import resolve_target  # noqa: E402


def time_records(calibration: Path) -> list[dict]:
    """The calibration's ``times`` and the ``step_times`` measured since (benchmarks/measurements)."""
    found = json.loads((calibration / "h200_public_more.json").read_text())["times"]
    for file in sorted((HERE / "measurements").glob("*.json")):
        found += json.loads(file.read_text()).get("step_times", [])
    return [{"model": r["model"], "batch": r["batch"], "precision": "fp32" if r["amp"] == "None" else "bf16-mixed",
             "measured": r["step_s"]} for r in found]


def estimate(record: dict) -> dict:
    spec = spec_for(record["model"])
    workload = Workload(name=record["model"], path="<benchmark>", line=1, build=spec.build,
                        example_inputs=spec.example_inputs, loss_fn=spec.loss_fn, build_optimizer=OPTIMIZERS["sgd"],
                        batch_size=record["batch"], input_shape=None, input_dtype="float32", optimizer=None,
                        precision=record["precision"], mode="train")
    started = time.perf_counter()
    report = analyse(workload, resolve_target("h200"), 1.0, find_max_batch=False)
    return {"step": report.step_time_s, "flops": report.flops_per_step, "bytes": report.bytes_per_step,
            "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=Path, default=HERE.parent.parent / "shared" / "calibration")
    parser.add_argument("--only", help="only records of this model")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown for the README")
    args = parser.parse_args()
    have_vision = torchvision_available()
    header = ["model", "batch", "precision", "measured ms", "memlint ms (lower bound)", "measured / memlint",
              "TFLOP/step", "GB moved/step"]
    rows, ratios = [], {"fp32": [], "bf16-mixed": []}
    for record in time_records(args.calibration):
        if (args.only and record["model"] != args.only) or (needs_torchvision(record["model"]) and not have_vision):
            continue
        result = estimate(record)
        ratio = record["measured"] / result["step"]
        ratios[record["precision"]].append(ratio)
        rows.append([record["model"], str(record["batch"]), record["precision"], f"{record['measured'] * 1e3:.2f}",
                     f"{result['step'] * 1e3:.2f}", f"{ratio:.2f}x", f"{result['flops'] / 1e12:.2f}",
                     f"{result['bytes'] / 1e9:.1f}"])
        print(f"  ({record['model']} {record['precision']}: analysed in {result['seconds']:.1f} s)", file=sys.stderr)
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(" --- " if i < 3 else " ---: " for i in range(len(header))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for row in rows:
            print("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    for precision, values in ratios.items():
        if values:
            print(f"{precision}: measured / lower bound: median {statistics.median(values):.2f}x, "
                  f"range {min(values):.2f}x to {max(values):.2f}x over {len(values)} models")
    if not have_vision:
        print("(torchvision is missing: image models skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
