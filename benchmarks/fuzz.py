"""Fuzz memlint at scale: thousands of generated sources and layer stacks (tests/fuzzing.py).

    python benchmarks/fuzz.py [--sources 5000] [--bytes 2000] [--stacks 1500] [--seed 0]

Prints the cases tried, the crashes (an exception that is not memlint's clear answer: must be
zero), the wrong answers (a static verdict that disagrees with CPython, or an estimate that
differs from the real CPU step: must be zero) and the worst estimate error, for stacks without
attention (compared to the byte) and with attention (within 10%; the host target runs the CPU's kernels).
The CI test (tests/test_fuzz.py) runs a few hundred of the same cases.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fuzzing  # noqa: E402


class Tally:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tried = 0
        self.crashes: list[str] = []
        self.wrong: list[str] = []
        self.start = time.perf_counter()

    def line(self) -> str:
        return (f"{self.name}: {self.tried} cases, {len(self.crashes)} crashes, {len(self.wrong)} wrong answers, "
                f"{time.perf_counter() - self.start:.0f} s")


def run_sources(count: int, strategy: st.SearchStrategy, name: str, random_seed: int) -> Tally:
    tally = Tally(name)
    if not count:  # hypothesis refuses max_examples=0
        return tally
    directory = Path(tempfile.mkdtemp(prefix="memlint-fuzz-"))

    @seed(random_seed)
    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=strategy)
    def case(data: bytes) -> None:
        tally.tried += 1
        try:
            fuzzing.lint_source(data, directory)
        except AssertionError as exc:
            tally.wrong.append(f"{exc!r}: {data[:200]!r}")
        except Exception:  # noqa: BLE001 - a crash: counted, the run goes on
            tally.crashes.append(f"{traceback.format_exc()}\n{data[:200]!r}")

    case()
    return tally


def run_stacks(count: int, random_seed: int) -> tuple[Tally, list[fuzzing.Comparison]]:
    tally = Tally("layer stacks")
    comparisons: list[fuzzing.Comparison] = []
    if not count:
        return tally, comparisons

    @seed(random_seed)
    @settings(max_examples=count, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=fuzzing.layer_stacks())
    def case(case: fuzzing.StackCase) -> None:
        tally.tried += 1
        try:
            comparison = fuzzing.compare_stack(case)
        except Exception:  # noqa: BLE001
            tally.crashes.append(f"{traceback.format_exc()}\n{case.describe()}")
            return
        comparisons.append(comparison)
        if not comparison.acceptable():
            tally.wrong.append(f"{case.describe()}: estimated {comparison.estimated}, measured {comparison.measured}, "
                               f"{comparison.estimate_error or ''} {comparison.real_error or ''}")
        if tally.tried % 100 == 0:
            print(f"  ... {tally.line()}", flush=True)

    case()
    return tally, comparisons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=5000)
    parser.add_argument("--bytes", type=int, default=2000)
    parser.add_argument("--stacks", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tallies = [run_sources(args.sources, fuzzing.python_sources().map(lambda t: t.encode("utf-8", "surrogatepass")),
                           "generated sources (static rules)", args.seed)]
    print(tallies[-1].line(), flush=True)
    tallies.append(run_sources(args.bytes, st.binary(max_size=400), "arbitrary bytes (static rules)", args.seed))
    print(tallies[-1].line(), flush=True)
    stacks, comparisons = run_stacks(args.stacks, args.seed)
    tallies.append(stacks)
    print(stacks.line(), flush=True)

    measured = [c for c in comparisons if c.estimated and c.measured]
    plain = [c for c in measured if not c.case.has_attention]
    attention = [c for c in measured if c.case.has_attention]
    refused = [c for c in comparisons if c.estimate_error and c.real_error]
    print()
    print(f"cases tried: {sum(t.tried for t in tallies)}")
    print(f"crashes: {sum(len(t.crashes) for t in tallies)}")
    print(f"wrong answers: {sum(len(t.wrong) for t in tallies)}")
    recurrent = sum(any(name == "recurrent" for name, _ in c.case.layers) for c in measured)
    print(f"stacks compared with the real CPU step: {len(measured)} ({len(attention)} with attention, {recurrent} "
          f"with an LSTM or GRU); refused by memlint and by PyTorch alike: {len(refused)}")
    for label, group in (("without attention", plain), ("with attention", attention)):
        worst = fuzzing.worst(group)
        if worst is not None:
            print(f"worst estimate error {label}: {worst.error:+.3%} ({worst.estimated} vs {worst.measured} bytes; "
                  f"{worst.case.describe()})")
    for tally in tallies:
        for problem in (tally.crashes + tally.wrong)[:5]:
            print(f"\n[{tally.name}] {problem}")
    sys.exit(1 if any(t.crashes or t.wrong for t in tallies) else 0)


if __name__ == "__main__":
    main()
