"""Run the suite's statistical and timing-sensitive tests N times and print their pass rates.

A test of a measured outcome (an accuracy, a ratio, a duration) carries the ``measured``
marker and records what it measured with pytest's ``record_property`` fixture, its gate
included (``record_property("gate", "accuracy >= 0.95")``). This script runs each such test
``--runs`` times (10 by default), optionally beside ``--load`` busy-looping processes that
take CPU from it as other jobs on a shared machine would, and prints one row per test: how
often it passed, and the lowest, median and highest value of each recorded measurement, so
a gate can be set with a margin that the measurements support.

    .venv/bin/python scripts/flake_check.py                     # every measured test, 10 runs
    .venv/bin/python scripts/flake_check.py --load 1 --runs 5 tests/test_training.py
    .venv/bin/python scripts/flake_check.py -k straggler --markdown

Each run is one pytest process over the selected tests, in the order collected, with its own
``--basetemp``; results are read back from its JUnit XML report. It exits 1 if any run of any
test failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Outcome:
    """What one test did over all runs."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    gates: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tests", nargs="*", help="test files or node ids (default: the whole suite)")
    p.add_argument("--runs", type=int, default=10, help="times each test runs (default 10)")
    p.add_argument(
        "--load",
        type=int,
        default=0,
        help="busy-looping processes kept running beside the tests (default 0)",
    )
    p.add_argument("-k", dest="keyword", help="pytest -k expression to narrow the selection")
    p.add_argument(
        "-m",
        dest="marker",
        default="measured",
        help="pytest -m expression (default: 'measured', the statistical and timing tests)",
    )
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument(
        "--jsonl",
        type=Path,
        help="append one JSON line per test per run (outcome, measured values) to this file",
    )
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    if args.load < 0:
        p.error("--load must be 0 or more")
    return args


@contextlib.contextmanager
def background_load(count: int) -> Iterator[None]:
    """``count`` processes that spin on the CPU until the block ends."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", "while True: pass"],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def one_run(args: argparse.Namespace, index: int, outcomes: dict[str, Outcome]) -> float:
    """Run the selection once; add each test's outcome; return the run's seconds."""
    with tempfile.TemporaryDirectory(prefix="flake-check-") as tmp:
        report = Path(tmp) / "report.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp}/base",
            f"--junitxml={report}",
            "-o",
            "junit_family=xunit1",
            "-m",
            args.marker,
            *(["-k", args.keyword] if args.keyword else []),
            *args.tests,
        ]
        started = time.monotonic()
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        seconds = time.monotonic() - started
        if not report.exists():
            sys.exit(
                f"run {index}: pytest wrote no report (exit {proc.returncode}):\n"
                f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
            )
        read_report(report, outcomes, args.jsonl, index)
    return seconds


def read_report(report: Path, outcomes: dict[str, Outcome], jsonl: Path | None, run: int) -> None:
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = outcomes[name]
        if jsonl is not None:
            with jsonl.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row(case, name, run)) + "\n")
        if case.find("skipped") is not None:
            outcome.skipped += 1
            continue
        trouble = case.find("failure")
        if trouble is None:
            trouble = case.find("error")
        if trouble is None:
            outcome.passed += 1
        else:
            outcome.failed += 1
            outcome.failures.append(first_line(trouble))
        outcome.seconds.append(float(case.get("time", "nan")))
        for prop in case.iter("property"):
            key, value = prop.get("name", ""), prop.get("value", "")
            if key == "gate":
                outcome.gates.add(value)
                continue
            with contextlib.suppress(ValueError):
                outcome.values[key].append(float(value))


def first_line(trouble: ET.Element) -> str:
    lines = (trouble.get("message") or "").splitlines()
    return lines[0][:2000] if lines else ""


def row(case: ET.Element, name: str, run: int) -> dict[str, object]:
    """One test's outcome in one run, for ``--jsonl``."""
    trouble = case.find("failure")
    if trouble is None:
        trouble = case.find("error")
    outcome = "skipped" if case.find("skipped") is not None else "passed"
    if trouble is not None:
        outcome = "failed"
    return {
        "run": run,
        "test": name,
        "outcome": outcome,
        "seconds": float(case.get("time", "nan")),
        "measured": {p.get("name"): p.get("value") for p in case.iter("property")},
        "failure": first_line(trouble) if trouble is not None else None,
    }


def spread(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "-"
    low, mid, high = min(finite), statistics.median(finite), max(finite)
    return f"{low:.4g} / {mid:.4g} / {high:.4g}"


def table(outcomes: dict[str, Outcome], markdown: bool) -> str:
    rows = [("test", "passed", "seconds (min/med/max)", "measured (min / median / max)", "gate")]
    for name, o in sorted(outcomes.items()):
        runs = o.passed + o.failed
        measured = "; ".join(f"{k} {spread(v)}" for k, v in sorted(o.values.items())) or "-"
        passed = f"{o.passed}/{runs}" + (f" ({o.skipped} skipped)" if o.skipped else "")
        short = name.removeprefix("tests.").replace(".py", "")
        rows.append((short, passed, spread(o.seconds), measured, "; ".join(sorted(o.gates))))
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)
    return "\n".join("  ".join(r) for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    outcomes: dict[str, Outcome] = defaultdict(Outcome)
    print(
        f"flake check: {args.runs} runs of -m {args.marker!r} "
        f"{' '.join(args.tests) or 'tests/'} beside {args.load} busy processes "
        f"on {os.cpu_count()} cores",
        flush=True,
    )
    with background_load(args.load):
        for i in range(1, args.runs + 1):
            seconds = one_run(args, i, outcomes)
            failed = sum(o.failed for o in outcomes.values())
            print(f"run {i}/{args.runs}: {seconds:.0f} s, failures so far {failed}", flush=True)
    if not outcomes:
        print("no test was selected", file=sys.stderr)
        return 2
    print(table(outcomes, args.markdown))
    for name, o in sorted(outcomes.items()):
        for message in o.failures:
            print(f"FAILED {name}: {message}")
    return 1 if any(o.failed for o in outcomes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
