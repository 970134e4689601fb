"""Shared test setup: makes ``tests/`` importable (``from parity import ...``), the ``one_thread``
fixture, and prints the parity table (optimizer -> reference -> max relative deviation) at the end of the run."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import parity  # noqa: E402


@pytest.fixture
def one_thread():
    """One torch CPU thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``): on a
    busy 2-core machine two OpenMP threads spin against other work and run ~10x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if not parity.RESULTS:
        return
    terminalreporter.section("parity with references (float64, 100 steps, 2 param groups)")
    terminalreporter.write_line(f"{'test':<44} {'reference':<44} {'max rel dev':>12}")
    for case, reference, deviation in sorted(parity.RESULTS):
        terminalreporter.write_line(f"{case:<44} {reference:<44} {deviation:>12.2e}")
