"""Run every static rule over real code nobody here wrote, and count what they say.

The corpus: the modelling files of the installed ``transformers`` (``transformers/models/**/modeling_*.py``)
and ``torch/nn/**/*.py``. Both are located with ``importlib.util.find_spec`` on the top-level package,
which finds the files without importing torch or transformers (checked at the end).

    python benchmarks/static_corpus.py                 # the table
    python benchmarks/static_corpus.py --show DEV001   # every DEV001 finding, with its source line
    python benchmarks/static_corpus.py --show DEV002 --sample 10 --seed 1
    python benchmarks/static_corpus.py --corpus none --extra path/to/training/scripts --show DEV003

A rule that raises is a crash (must stay zero); a file libcst cannot parse is a parse failure,
reported separately.
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # a top-level name: finds, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def corpus(which: str) -> list[tuple[str, Path]]:
    """(label, path) for every file of the corpus, sorted."""
    files: list[tuple[str, Path]] = []
    if which in ("all", "transformers"):
        root = package_dir("transformers")
        if root is not None:
            files += [(f"transformers/{p.relative_to(root)}", p) for p in sorted((root / "models").rglob("modeling_*.py"))]
    if which in ("all", "torch"):
        root = package_dir("torch")
        if root is not None:
            files += [(f"torch/{p.relative_to(root)}", p) for p in sorted((root / "nn").rglob("*.py"))]
    return files


@dataclass
class Finding:
    label: str
    line: int
    column: int
    severity: str
    message: str
    source_line: str


@dataclass
class Results:
    files: int = 0
    lines: int = 0
    parse_failures: list[tuple[str, str]] = field(default_factory=list)
    parse_seconds: float = 0.0
    rule_seconds: Counter = field(default_factory=Counter)
    findings: dict[str, list[Finding]] = field(default_factory=lambda: defaultdict(list))
    crashes: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    seconds: float = 0.0
    cpu_seconds: float = 0.0


def run(files: list[tuple[str, Path]], rules: list[type]) -> Results:
    import libcst as cst

    from memlint.rules._static import facts
    from memlint.rules.base import RuleContext
    from memlint.settings import Settings

    settings = Settings()
    results = Results()
    started = time.perf_counter()
    cpu_started = time.process_time()
    for label, path in files:
        source = path.read_text(encoding="utf-8", errors="replace")
        results.files += 1
        results.lines += source.count("\n") + (0 if source.endswith("\n") or not source else 1)
        ctx = RuleContext(path=label, source=source, settings=settings)
        t0 = time.process_time()
        try:
            ctx.wrapper  # noqa: B018 - parse now, so the parse time is not charged to the first rule
        except cst.ParserSyntaxError as exc:
            results.parse_failures.append((label, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
            continue
        finally:
            results.parse_seconds += time.process_time() - t0
        t0 = time.process_time()
        try:
            facts(ctx)  # the one shared pass every static rule reads; timed on its own row
        except Exception:  # noqa: BLE001
            results.crashes["shared"].append((label, traceback.format_exc()))
            continue
        finally:
            results.rule_seconds["shared"] += time.process_time() - t0
        lines = ctx.lines
        for rule in rules:
            t0 = time.process_time()
            try:
                for d in rule().check(ctx):
                    text = lines[d.line - 1].strip() if 1 <= d.line <= len(lines) else ""
                    results.findings[rule.code].append(
                        Finding(label, d.line, d.column, d.severity.value, d.message, text))
            except Exception:  # noqa: BLE001 - a crash is what we count
                results.crashes[rule.code].append((label, traceback.format_exc()))
            results.rule_seconds[rule.code] += time.process_time() - t0
    results.seconds = time.perf_counter() - started
    results.cpu_seconds = time.process_time() - cpu_started
    return results


def print_table(results: Results, rules: list[type]) -> None:
    rate = results.lines / results.seconds if results.seconds else 0.0
    cpu_rate = results.lines / results.cpu_seconds if results.cpu_seconds else 0.0
    print(f"files: {results.files}   lines: {results.lines}   parse failures: {len(results.parse_failures)}")
    print(f"time: {results.seconds:.2f} s wall, {results.cpu_seconds:.2f} s CPU "
          f"(parse and MetadataWrapper {results.parse_seconds:.2f} s CPU)")
    print(f"throughput: {rate:,.0f} lines/s wall, {cpu_rate:,.0f} lines per CPU-second "
          f"(the CPU figure does not depend on what else the machine runs)")
    print()
    print(f"{'rule':<8}{'findings':>10}{'warning':>9}{'info':>7}{'files':>7}{'crashes':>9}{'cpu s':>9}  name")
    for rule in rules:
        found = results.findings.get(rule.code, [])
        by_severity = Counter(f.severity for f in found)
        files = len({f.label for f in found})
        print(f"{rule.code:<8}{len(found):>10}{by_severity.get('warning', 0):>9}{by_severity.get('info', 0):>7}"
              f"{files:>7}{len(results.crashes.get(rule.code, [])):>9}{results.rule_seconds[rule.code]:>9.2f}  {rule.name}")
    print(f"{'shared':<8}{'':>10}{'':>9}{'':>7}{'':>7}{len(results.crashes.get('shared', [])):>9}"
          f"{results.rule_seconds['shared']:>9.2f}  one pass collecting imports, classes, loops, calls")
    print("(CPU seconds; a rule's include resolving positions the first time a file has a finding)")
    for label, error in results.parse_failures:
        print(f"parse failure: {label}: {error}")
    for code, crashes in results.crashes.items():
        for label, trace in crashes[:3]:
            print(f"\ncrash in {code} on {label}:\n{trace}")


def show(results: Results, code: str, sample: int | None, seed: int) -> None:
    found = results.findings.get(code.upper(), [])
    if sample is not None and sample < len(found):
        found = sorted(random.Random(seed).sample(found, sample), key=lambda f: (f.label, f.line))
    for f in found:
        print(f"{f.label}:{f.line}:{f.column}: {code.upper()} [{f.severity}] {f.message}")
        print(f"    | {f.source_line}")
    print(f"\n{len(found)} shown of {len(results.findings.get(code.upper(), []))} {code.upper()} findings")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", metavar="CODE", action="append", default=[],
                        help="print the findings of a rule with file:line and source (repeat for more rules)")
    parser.add_argument("--sample", type=int, help="with --show: a random sample of this many findings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--corpus", choices=("all", "transformers", "torch", "none"), default="all")
    parser.add_argument("--limit", type=int, help="only the first N files (a quick run)")
    parser.add_argument("--extra", action="append", default=[], metavar="PATH",
                        help="also lint these files or folders (*.py, recursively), e.g. training scripts")
    args = parser.parse_args(argv)

    from memlint.rules.base import all_rules

    rules = [rule for rule in all_rules() if not rule.needs_model]
    files = corpus(args.corpus)
    for extra in args.extra:
        root = Path(extra)
        found = [root] if root.is_file() else sorted(root.rglob("*.py"))
        files += [(f"extra/{p.relative_to(root.parent) if root.is_dir() else p.name}", p) for p in found]
    if args.limit:
        files = files[: args.limit]
    if not files:
        print("no corpus found: install transformers and/or torch", file=sys.stderr)
        return 2
    results = run(files, rules)
    for code in args.show:
        show(results, code, args.sample, args.seed)
        print()
    print_table(results, rules)
    leaked = [name for name in ("torch", "transformers") if name in sys.modules]
    if leaked:
        print(f"\nERROR: the static rules imported {', '.join(leaked)}", file=sys.stderr)
        return 1
    crashes = sum(len(c) for c in results.crashes.values())
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
