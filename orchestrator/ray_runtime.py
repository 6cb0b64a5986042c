"""Connecting to Ray: an embedded local instance by default, or a cluster at `address`.

Ray's own output (startup banners, worker stdout, task logs) stays in Ray's session log files,
out of the user's terminal; the path goes to the driver log. The embedded dashboard listens on
127.0.0.1 only, and Ray's token authentication, on by default for local clusters, is left on.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable, Sequence

import ray

log = logging.getLogger(__name__)

# Each task owns one CPU: a tokenizer fanning out over every core would oversubscribe the node.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def connect(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(
        address=address,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env={"env_vars": WORKER_ENV},
    )
    if threading.current_thread() is threading.main_thread():
        # ray.init installs a SIGTERM handler that exits at once; the caller's (the CLI marks the
        # run record stopped) must survive it.
        signal.signal(signal.SIGTERM, on_sigterm)
    log.info("connected to Ray %s (session logs: %s)", address or "embedded",
             ray._private.worker._global_node.get_session_dir_path() if ray._private.worker._global_node else "remote")


def capacity() -> tuple[dict[str, float], list[dict[str, float]]]:
    """(the cluster's schedulable resources, each alive node's), without Ray's bookkeeping keys."""
    def schedulable(resources: dict) -> dict[str, float]:
        return {k: v for k, v in resources.items()
                if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
    nodes = [schedulable(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    return schedulable(ray.cluster_resources()), nodes


def run_all(refs: Sequence[ray.ObjectRef], on_done: Callable[[], None]) -> list:
    """Wait for every task, calling `on_done` as each finishes; the first failure raises."""
    index = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results[index[done[0]]] = ray.get(done[0])
        on_done()
    return results
