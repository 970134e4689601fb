"""Running a multi-process launch from a test."""
from __future__ import annotations

import os
import signal
import subprocess
import warnings
from typing import Any

# Seen in clean-clone CI runs, about one launch in 25 (never reproduced in 50 launches of
# examples/ddp_train.py outside pytest, idle or loaded): a rank aborts in C++ ("terminate called
# without an active exception": a gloo thread torn down at start-up or exit), or hangs at exit
# (gdb: the main thread, holding the GIL, joins a gloo run-loop thread in ~ProcessGroupGloo while
# that thread waits for the GIL to free a finished barrier's thread-local state).
CPP_ABORT = "terminate called without an active exception"
RELAUNCHES = 2


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc: torchrun starts each rank in a session of its own,
    so killing the launcher's group leaves them, and their inherited pipes, alive)."""
    parent: dict[int, int] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        kids = [p for p, pp in parent.items() if pp == current]
        found += kids
        todo += kids
    return found


def _run(cmd: list[str], timeout: float | None = None, **kwargs: Any) -> subprocess.CompletedProcess | None:
    """``cmd``; on timeout it and every process below it are killed (no orphaned rank) -> None."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()  # every writer of the pipes is gone
        return None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_launch(cmd: list[str], timeout: float | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)``, relaunched
    (at most RELAUNCHES times, with a warning) when it aborted with exactly the C++ abort above or
    ran past ``timeout`` (the exit hang); any other failure is returned as is."""
    for attempt in range(RELAUNCHES + 1):
        result = _run(cmd, timeout, **kwargs)
        if result is not None and (result.returncode == 0 or CPP_ABORT not in result.stdout + result.stderr):
            return result
        if attempt < RELAUNCHES:
            why = "ran past its timeout" if result is None else "aborted in C++ (SIGABRT)"
            warnings.warn(f"{cmd[-3:]}: launch {why}, relaunch {attempt + 1} of {RELAUNCHES}")
    if result is None:
        raise subprocess.TimeoutExpired(cmd, timeout or 0)
    return result
