"""Every torchvision model: memlint's estimate against a real CPU step, and how long the analysis took.

    python benchmarks/torchvision_zoo.py [--families classification,detection,segmentation,video,optical_flow]
                                         [--only NAME,...] [--jobs 1] [--timeout 900] [--json FILE]

Needs torchvision (the benchmark environment). Each model of ``torchvision.models.list_models`` is built
without weights, trained for three real CPU steps (Adam) and analysed by memlint on ``cpu:64GiB`` with
the same inputs, each in a fresh process: detection models on two 320 x 320 images with two boxes of
class 1 each (Keypoint R-CNN has one class), which their transform scales to 800 pixels; classification
and segmentation models on two 224 x 224 images (Inception v3: 299 x 299); video models on two clips of 8
frames of 112 x 112 (MViT and S3D: 16 of 224 x 224); RAFT on two pairs of 128 x 128 frames (inputs from
``workloads.family_inputs``, which the GPU measurements share). A host target runs the CPU's own
kernels, so the real step is the ground truth to the byte, where the step's memory does not depend on
values the data decides: a detector's non-maximum suppression keeps the boxes the data leaves, and
memlint assumes it keeps every one (an upper bound, reported as such).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import family_inputs, torchvision_model  # noqa: E402
from zoo import add_run_options, run_command_isolated, summarise  # noqa: E402

FAMILIES = ("classification", "detection", "segmentation", "video", "optical_flow")
BATCH = 2


def models_of(family: str) -> list[str]:
    import torchvision

    module = torchvision.models if family == "classification" else getattr(torchvision.models, family)
    return torchvision.models.list_models(module=module)


def measure_one(family: str, name: str) -> dict[str, Any]:
    """The real step and memlint's estimate for one model (run in its own process)."""
    import torch

    from fuzzing import real_step_peak
    from memlint.errors import ModelError
    from memlint.estimator import Workload, analyse
    from memlint.step import first_float_tensor
    from memlint.targets import resolve_target

    def build() -> torch.nn.Module:
        return torchvision_model(family, name)

    example_inputs, loss_fn = family_inputs(family, name)

    def make_inputs() -> tuple[tuple, dict]:
        value = example_inputs(BATCH)
        return (tuple(value) if isinstance(value, (tuple, list)) else (value,)), {}

    def real_loss(output: Any, args: tuple, _kwargs: dict) -> Any:
        return loss_fn(output, args) if loss_fn else first_float_tensor(output).mean()

    try:
        measured = real_step_peak(build, make_inputs, real_loss)
    except Exception as exc:  # noqa: BLE001
        return {"status": "skipped", "why": f"real step: {type(exc).__name__}: {str(exc)[:200]}"}
    workload = Workload(name=name, path=f"{name}.py", line=1, build=build, example_inputs=example_inputs,
                        loss_fn=loss_fn, build_optimizer=None, batch_size=BATCH, input_shape=None,
                        input_dtype="float32", optimizer="adam", precision="fp32", mode="train")
    start = time.perf_counter()
    try:
        report = analyse(workload, resolve_target("cpu:64GiB"), 1.0, find_max_batch=False)
    except ModelError as exc:
        return {"status": "refused", "measured": measured, "why": exc.message[:300]}
    except Exception as exc:  # noqa: BLE001 - a crash is what this benchmark looks for
        return {"status": "crash", "measured": measured, "why": "".join(traceback.format_exception(exc)[-4:])[-800:]}
    bounds = sorted({note.split(":")[0] for note in report.assumptions if "upper bound" in note})
    return {"status": "ok", "measured": measured, "estimated": report.peak_allocated_bytes,
            "seconds": round(time.perf_counter() - start, 1), "why": ("upper bounds: " + ", ".join(bounds))
            if bounds else ""}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    add_run_options(parser, jobs=1, timeout=900, memory_limit=20)
    parser.add_argument("--one", nargs=2, metavar=("FAMILY", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one)))
        return 0
    only = set(filter(None, args.only.split(",")))
    cases = [(family, name) for family in args.families.split(",") for name in models_of(family)
             if not only or name in only]

    def run(case: tuple[str, str]) -> tuple[str, str, dict[str, Any]]:
        result = run_command_isolated([sys.executable, __file__, "--one", *case], args.timeout, args.memory_limit)
        error = f"{result['estimated'] / result['measured'] - 1:+7.1%}" if result["status"] == "ok" else ""
        print(f"{case[0]:14} {case[1]:34} {result['status']:8} {result.get('measured', ''):>12} "
              f"{result.get('estimated', ''):>12} {error:>8} {result.get('seconds', ''):>6} "
              f"{result.get('why', '')[:200]}", flush=True)
        return (*case, result)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, cases))
    if args.json:
        args.json.write_text(json.dumps([{"family": f, "name": n, **r} for f, n, r in results], indent=1))
    summarise([result for _, _, result in results])
    return 0


if __name__ == "__main__":
    sys.exit(main())
