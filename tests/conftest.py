"""Shared test setup: makes ``tests/`` importable (``from parity import ...``) and prints the
parity table (optimizer -> reference -> max relative deviation) at the end of the run."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import parity  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if not parity.RESULTS:
        return
    terminalreporter.section("parity with references (float64, 100 steps, 2 param groups)")
    terminalreporter.write_line(f"{'test':<44} {'reference':<44} {'max rel dev':>12}")
    for case, reference, deviation in sorted(parity.RESULTS):
        terminalreporter.write_line(f"{case:<44} {reference:<44} {deviation:>12.2e}")
