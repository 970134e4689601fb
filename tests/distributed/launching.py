"""Running a multi-process launch from a test."""
from __future__ import annotations

import subprocess
import warnings
from typing import Any

# Seen in clean-clone CI runs: a rank aborts in C++ ("terminate called without an active
# exception": a gloo thread torn down at start-up or exit), not reproducible on relaunch.
CPP_ABORT = "terminate called without an active exception"


def run_launch(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)``, relaunched once, with a
    warning, when it failed with exactly the C++ abort above; any other failure is returned as is."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0 and CPP_ABORT in result.stdout + result.stderr:
        warnings.warn(f"{cmd[-3:]}: launch aborted in C++ (SIGABRT), relaunching once")
        result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return result
