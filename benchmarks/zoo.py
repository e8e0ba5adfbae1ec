"""Every transformers architecture that builds from a small config: memlint's estimate against a real CPU step.

    python benchmarks/zoo.py [--kinds causal-lm,masked-lm,image-classification] [--only NAME,...]
                             [--jobs 2] [--timeout 180] [--batch 4] [--sequence 128]
                             [--precision fp32|bf16-mixed] [--mode train|infer] [--json FILE]
                             [--memory-limit 16]

The issue's bar "no model that runs in eager PyTorch may be refused" asks for every architecture,
not the twenty that have GPU records. This takes every model type of transformers' auto mappings
(causal and masked language models, image classifiers) through ``measure_one`` (tests/model_zoo.py:
a small config, three real CPU training steps, memlint's analysis on ``cpu:64GiB``), each in a fresh
process under an address-space limit (a default config too large to build fails there), and
prints per model the status (ok, refused, crash, timeout, skipped), the measured and estimated
peaks and the error, then the counts and the error's median and worst.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from model_zoo import BATCH_DEFAULT, KINDS, SEQUENCE_DEFAULT, measure_one  # noqa: E402


def model_types(kinds: list[str]) -> list[tuple[str, str]]:
    from transformers.models.auto import modeling_auto

    return [(kind, model_type) for kind in kinds for model_type in getattr(modeling_auto, KINDS[kind])]


def run_isolated(kind: str, model_type: str, args: argparse.Namespace) -> dict[str, Any]:
    return run_command_isolated([sys.executable, __file__, "--one", kind, model_type, "--batch", str(args.batch),
                                 "--sequence", str(args.sequence), "--precision", args.precision, "--mode",
                                 args.mode], args.timeout, args.memory_limit)


def add_run_options(parser: argparse.ArgumentParser, *, jobs: int, timeout: float, memory_limit: float) -> None:
    """The options of a zoo run: which models, how many at a time, each one's limits, where the JSON goes."""
    parser.add_argument("--only", default="", help="model names, comma-separated")
    parser.add_argument("--jobs", type=int, default=jobs)
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per model")
    parser.add_argument("--memory-limit", type=float, default=memory_limit,
                        help="GiB of address space per model's process")
    parser.add_argument("--json", type=Path, help="also write every result to this file")


def run_command_isolated(command: list[str], timeout: float, memory_limit_gib: float) -> dict[str, Any]:
    """Run one model's measurement in a fresh process under an address-space limit; the JSON it printed last."""
    def limit_memory() -> None:  # a default config too large to build fails in its process, not the machine
        limit = int(memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, preexec_fn=limit_memory)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "why": f"over {timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"status": "crash", "why": f"exit {done.returncode}: {done.stderr.strip()[-600:]}"}
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(KINDS))
    add_run_options(parser, jobs=2, timeout=180, memory_limit=16)
    parser.add_argument("--batch", type=int, default=BATCH_DEFAULT)
    parser.add_argument("--sequence", type=int, default=SEQUENCE_DEFAULT)
    parser.add_argument("--precision", choices=("fp32", "bf16-mixed"), default="fp32")
    parser.add_argument("--mode", choices=("train", "infer"), default="train")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "MODEL_TYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one, args.batch, args.sequence, args.precision, args.mode)))
        return 0
    only = set(filter(None, args.only.split(",")))
    cases = [case for case in model_types(args.kinds.split(",")) if not only or case[1] in only]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda case: (*case, run_isolated(*case, args)), cases))
    for kind, model_type, result in results:
        error = (f"{result['estimated'] / result['measured'] - 1:+7.1%}" if result["status"] == "ok" else "")
        print(f"{kind:22} {model_type:28} {result['status']:8} {result.get('measured', ''):>12} "
              f"{result.get('estimated', ''):>12} {error:>8} {result.get('why', '')[:200]}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([{"kind": k, "model_type": m, **r} for k, m, r in results], indent=1))
    summarise([result for _, _, result in results])
    return 0


def summarise(results: list[dict[str, Any]]) -> None:
    by_status: dict[str, int] = {}
    for result in results:
        by_status[result["status"]] = by_status.get(result["status"], 0) + 1
    errors = [abs(r["estimated"] / r["measured"] - 1) for r in results if r["status"] == "ok"]
    print(f"\n{len(results)} model types: " + ", ".join(f"{n} {s}" for s, n in sorted(by_status.items())))
    if errors:
        print(f"answered: {len(errors)}; median abs. error {statistics.median(errors):.1%}; "
              f"exact {sum(e == 0 for e in errors)}; within 2% {sum(e <= 0.02 for e in errors)}; "
              f"worst {max(errors):.1%}")


if __name__ == "__main__":
    sys.exit(main())
