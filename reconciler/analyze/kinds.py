"""What a file is for, judged from its path: source, test, example or bench. Tests are left
out of the diagram and of the summaries by default; examples and benches are kept."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

KINDS = ("source", "test", "example", "bench")
TEST_DIRECTORIES = {"tests", "test", "__tests__", "testing", "spec", "specs"}
EXAMPLE_DIRECTORIES = {"examples", "example"}
BENCH_DIRECTORIES = {"benches", "bench", "benchmarks"}
# test_x.py, x_test.py, x_test.go, x.test.ts, x.spec.tsx, conftest.py
TEST_NAME = re.compile(r"^(test_.*\.py|.*_test\.\w+|.*\.(test|spec)\.\w+|conftest\.py)$")


def file_kind(path: str) -> str:
    pure = PurePosixPath(path)
    directories = set(pure.parent.parts)
    if directories & TEST_DIRECTORIES or TEST_NAME.match(pure.name):
        return "test"
    if directories & EXAMPLE_DIRECTORIES:
        return "example"
    if directories & BENCH_DIRECTORIES:
        return "bench"
    return "source"


def parse_kinds(text: str) -> frozenset[str]:
    """`--summarize source,example`: the kinds named, or a ValueError naming the fix."""
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    if "all" in chosen:
        return frozenset(KINDS)
    unknown = chosen - set(KINDS)
    if unknown or not chosen:
        raise ValueError(
            f"--summarize {text!r}: unknown kind(s) {', '.join(sorted(unknown)) or '(none given)'}; "
            f"give a comma-separated list of {', '.join(KINDS)}, or all"
        )
    return frozenset(chosen)
