"""Fuzzing: generated sources through the static rules, generated layer stacks through the estimator.

No crash, no silent wrong answer: every source gets its findings, or E999/E902 exactly when it
is not valid Python; every stack gets the peak the same step really allocates on the CPU (to
the byte; within 10% with attention, whose GPU kernel memlint models) or, when the real step
fails (an in-place op breaking backward), a clear error. A few hundred cases here;
``benchmarks/fuzz.py`` runs thousands.
"""
from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fuzzing import compare_stack, layer_stacks, lint_source, python_sources

FAST = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


@settings(FAST, max_examples=300)
@given(source=python_sources())
# String literals that libcst parses and CPython does not decode: E999 all the same (one was found so).
@example(source="x += 'cp\\u'\n")
@example(source="x = '\\N{no such character}'\n")
@example(source="x = b'caf\u00e9'\n")
def test_static_rules_on_generated_sources(source, tmp_path_factory):
    lint_source(source.encode("utf-8", "surrogatepass"), tmp_path_factory.mktemp("src"))


@settings(FAST, max_examples=150)
@given(data=st.one_of(st.binary(max_size=400), st.text(max_size=200).map(lambda t: t.encode("utf-8", "replace"))))
def test_static_rules_on_arbitrary_bytes(data, tmp_path_factory):
    lint_source(data, tmp_path_factory.mktemp("bytes"))


@settings(FAST, max_examples=100)
@given(case=layer_stacks())
def test_estimate_matches_the_real_cpu_step(case):
    comparison = compare_stack(case)
    assert comparison.acceptable(), (case.describe(), comparison)
