"""Running a multi-process launch from a test."""
from __future__ import annotations

import subprocess
import warnings
from typing import Any

# Seen in clean-clone CI runs, about one launch in 25 (never reproduced in 50 launches of
# examples/ddp_train.py outside pytest, idle or loaded): a rank aborts in C++ ("terminate called
# without an active exception": a gloo thread torn down at start-up or exit).
CPP_ABORT = "terminate called without an active exception"
RELAUNCHES = 2


def run_launch(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)``, relaunched (at most
    RELAUNCHES times, with a warning) when it failed with exactly the C++ abort above; any other
    failure is returned as is."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    for attempt in range(RELAUNCHES):
        if result.returncode == 0 or CPP_ABORT not in result.stdout + result.stderr:
            break
        warnings.warn(f"{cmd[-3:]}: launch aborted in C++ (SIGABRT), relaunch {attempt + 1} of {RELAUNCHES}")
        result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return result
