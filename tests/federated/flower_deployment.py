"""A throw-away Flower deployment on localhost for tests: one ``flower-superlink``, N
``flower-supernode`` processes and the ``flwr`` CLI talking to the SuperLink's Control API.

Flower 1.42 serves the Fleet, Control and (ServerApp) Runtime APIs of the SuperLink on one HTTP
port (``--host``/``--port``; the older ``--fleet-api-address``/``--control-api-address`` are
deprecated, ``--serverappio-api-address`` is refused), and each SuperNode serves its (ClientApp)
Runtime API on its own ``--port`` (``--clientappio-api-address`` is refused). Every port here is a
free one, so parallel runs do not collide. Each process gets its own ``FLWR_HOME`` (apps are
unpacked there), as on separate machines; the CLI's ``FLWR_HOME/config.toml`` holds one
insecure connection to the SuperLink.

Both the SuperLink and the SuperNodes start a detached ``flower-superexec`` (own session) that
spawns ``flwr-serverapp`` / ``flwr-clientapp`` processes, so :meth:`Deployment.stop` kills the
process group of every process it started *and* of every descendant and every process whose
command line names one of this deployment's ports (the SuperExecs and apps orphaned when a
parent died first).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

# No telemetry, no update check, no Ray usage stats, one thread per process (2-core CI machines).
QUIET_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_USAGE_STATS_ENABLED": "0",
             "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Set, these make the SuperLink also bind the legacy gRPC APIs on fixed default ports.
LEGACY_GRPC_ENV = ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API")


def executable(name: str) -> str | None:
    """``name`` next to this interpreter (the venv's ``bin``), else on ``PATH``."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the OS reports free on 127.0.0.1 (all sockets held open together)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) from /proc (empty where there is no /proc)."""
    table: dict[int, tuple[int, str]] = {}
    if not os.path.isdir("/proc"):
        return table
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(comm)": state, ppid, ...
        table[int(entry)] = (ppid, cmdline)
    return table


def _kill_group(pid: int, sig: int) -> None:
    """``sig`` to the process group of ``pid`` (never to this process's own group)."""
    try:
        group = os.getpgid(pid)
        if group != os.getpgrp():
            os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Deployment:
    """SuperLink + SuperNodes under ``root`` (logs: ``root/<name>.log``)."""

    def __init__(self, root: Path, node_configs: Sequence[str], connection: str = "local-deployment"):
        self.root, self.node_configs, self.connection = Path(root), list(node_configs), connection
        self.link_port, *self.node_ports = free_ports(1 + len(self.node_configs))
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self.cli_home = self.root / "cli-home"
        self.cli_home.mkdir(parents=True, exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{connection}"\n\n'
            f'[superlink.{connection}]\naddress = "127.0.0.1:{self.link_port}"\ninsecure = true\n')

    def env(self, home: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in LEGACY_GRPC_ENV}
        env.update(QUIET_ENV, FLWR_HOME=str(home))
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _spawn(self, name: str, cmd: list[str]) -> None:
        home = self.root / f"{name}-home"
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (closed in stop())
        self._logs.append(log)
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=self.env(home), cwd=home, start_new_session=True)

    def start(self, timeout: float = 60.0) -> None:
        """Start everything; return once the SuperLink accepts connections. The SuperNodes
        register while the run starts (the ServerApp waits for ``min-nodes`` of them)."""
        # Runtime dependency installation (on by default) would `uv sync` the app's dependencies
        # from the package index; distopt is installed here from the working tree.
        self._spawn("superlink", [executable("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                  "--port", str(self.link_port), "--disable-runtime-dependency-installation"])
        for k, (config, port) in enumerate(zip(self.node_configs, self.node_ports)):
            self._spawn(f"supernode{k}", [executable("flower-supernode"), "--insecure",
                                          "--superlink", f"127.0.0.1:{self.link_port}", "--host", "127.0.0.1",
                                          "--port", str(port), "--node-config", config, "--max-wait-time", "120"])
        deadline = time.monotonic() + timeout
        while not _listening(self.link_port):
            dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"SuperLink not up on port {self.link_port} (exited: {dead})\n{self.logs()}")
            time.sleep(0.2)

    def flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """``flwr ARGS`` with the CLI's FLWR_HOME (the connection above)."""
        return subprocess.run([executable("flwr"), *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env(self.cli_home), cwd=self.root, stdin=subprocess.DEVNULL)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {name}.log (tail)\n{self.log(name)[-tail:]}" for name in self.procs)

    def _stragglers(self) -> set[int]:
        """Descendants of the started processes, and processes naming one of our ports."""
        table = _proc_table()
        found = {p.pid for p in self.procs.values()}
        ports = [f"127.0.0.1:{port}" for port in (self.link_port, *self.node_ports)]
        found |= {pid for pid, (_, cmd) in table.items() if "flwr" in cmd or "flower" in cmd
                  if any(port in cmd for port in ports)}
        grew = True
        while grew:
            more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
            grew, found = bool(more), found | more
        return found - {os.getpid()}

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to every process group involved, SIGKILL to what is left after ``grace`` s."""
        try:
            pids = self._stragglers()
            for pid in pids:
                _kill_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            for pid in pids | self._stragglers():
                _kill_group(pid, signal.SIGKILL)
            for proc in self.procs.values():
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for log in self._logs:
                log.close()
