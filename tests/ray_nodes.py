"""Real Ray nodes for tests, all on 127.0.0.1: `ray start --block` processes, each in a session of
its own with its own temp dir and ports, stopped by pid (never `ray stop`: it would stop every Ray
on the machine, other test sessions' included).

Ray advertises the machine's interface address for 127.0.0.1 (`services.resolve_ip_for_localhost`)
unless told it is not a cluster machine: LOOPBACK_ONLY keeps a driver, a head and the nodes an
autoscaler starts on loopback. (`ray start --address` refuses to join a cluster under it, so nodes
joined by hand get `--node-ip-address=127.0.0.1` instead.)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time

import psutil

BIN = os.path.dirname(sys.executable)
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# On SIGTERM (teardown), stop at once instead of draining for up to 30 s.
NODE_ENV = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
# The GCS declares a node dead after 3 missed 1 s health checks instead of Ray's default (3 s
# period, 10 s timeout, 5 misses: ~15 s here); set on the head, where the GCS runs.
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
                   "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str, timeout_s: float, poll_s: float = 0.2, check=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if check is not None:
            check()
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def user_env(root: str) -> dict[str, str]:
    """The environment of a cluster's user (and of its nodes): a fresh token, no other address."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), PATH=f"{BIN}:{env.get('PATH', '')}",
               TOKENIZERS_PARALLELISM="false", ORCHESTRATOR_LOG_DIR=os.path.join(root, "driver-logs"))
    return env


def ray_start(root: str, name: str, args: list[str]) -> list[str]:
    """`ray start --block` for one node. Temp dirs stay short: Ray's socket paths must fit in 107 bytes."""
    return [os.path.join(BIN, "ray"), "start", "--block", "--node-ip-address=127.0.0.1", *args,
            f"--temp-dir={root}/{name}", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats"]


def cmdline(p: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(p.cmdline())
    return ""


def kill(processes) -> None:
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.kill()


class Node:
    """One `ray start --block`, in a session of its own, logging to `log_path`."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: str):
        self.name = name
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def processes(self) -> list[psutil.Process]:
        """Every process of the node: its session. (Ray starts each worker in a process group of
        its own, so the node's process group alone would leave its workers running.)"""
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if os.getsid(p.pid) == self.proc.pid:
                    found.append(p)
        return found

    def runs(self, title: str) -> bool:
        """Whether one of the node's processes is titled `title` (Ray names workers ray::<Actor>)."""
        return any(title in cmdline(p) for p in self.processes())

    def vanish(self) -> None:
        """SIGKILL every process of the node at once: raylet, object store, agents, workers."""
        for _ in range(2):  # and whatever was starting meanwhile
            kill(self.processes())
        self.proc.wait()

    def stop(self) -> None:
        """Stop our `ray start --block` (it stops what it started), then kill what is left of
        its session."""
        if self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
        self.vanish()
        self.log.close()

    def tail(self) -> str:
        return f"--- {self.name} ---\n{open(self.log_path).read()[-1500:]}"


def alive_nodes(address: str, env: dict[str, str]) -> list[dict[str, float]] | None:
    """The resources of each node the GCS counts alive, asked from a fresh process (this one's Ray
    settings are not the cluster's; `ray list nodes` would need the dashboard); None if it failed."""
    script = ("import json, sys; from ray._raylet import GcsClient; "
              "print(json.dumps([dict(n.resources_total) for n in "
              "GcsClient(address=sys.argv[1]).get_all_node_info().values() if n.state == 0]))")
    result = subprocess.run([sys.executable, "-c", script, address], env=env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])
