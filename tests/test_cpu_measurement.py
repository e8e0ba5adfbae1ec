"""The estimate against memory a real training step allocates on this machine's CPU.

The measurement (measure_cpu_step.py) is independent of memlint: peak RSS of a fresh
process running three real SGD-momentum steps. The CPU runtime adds a constant of its
own (oneDNN caches, thread arenas) that a GPU step does not have, so we compare what
depends on the batch: the growth of the peak from batch 16 to batch 64, within 5%.
"""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import MODELS, memlint

MODEL = MODELS / "small_cnn.py"


def measured_peak(batch: int) -> int:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, str(MODELS.parent / "measure_cpu_step.py"), str(MODEL), str(batch)],
                          capture_output=True, text=True, env=env, timeout=300, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def estimated_peak(batch: int) -> int:
    run = memlint("check", str(MODEL), "--target", "cpu:8GiB", "--batch-size", str(batch),
                  "--optimizer", "sgd-momentum", "--output-format", "json")
    assert run.code in (0, 1), run.err
    return run.json()["models"][0]["peak_allocated_bytes"]


def test_batch_dependent_memory_matches_a_real_cpu_step():
    measured = measured_peak(64) - measured_peak(16)
    estimated = estimated_peak(64) - estimated_peak(16)
    assert abs(estimated - measured) / measured < 0.05, (estimated, measured)


def test_estimate_is_not_above_the_real_peak_by_more_than_the_cpu_runtime_constant():
    measured, estimated = measured_peak(16), estimated_peak(16)
    # The estimate leaves out only the CPU runtime's own caches: it must not exceed the
    # measurement, and must account for most of it.
    assert estimated <= measured
    assert estimated > 0.4 * measured
