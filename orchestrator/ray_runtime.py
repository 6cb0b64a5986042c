"""Connecting to Ray: an embedded local instance by default, or a cluster at `address`.

Ray's own output (startup banners, worker stdout, task logs) stays in Ray's session log files,
out of the user's terminal; the path goes to the driver log. The embedded dashboard listens on
127.0.0.1 only, and Ray's token authentication, on by default for local clusters, is left on.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import ray

from orchestrator import autoscaler_config, ray_internals

log = logging.getLogger(__name__)

# Each task owns one CPU: a tokenizer fanning out over every core would oversubscribe the node.
# A Ray worker has a couple of dozen threads, so glibc's malloc locks an arena for whatever its
# per-thread cache (7 chunks per size by default) cannot serve; tokenizers allocates a few small
# chunks per token, and that costs a worker ~8% of its tokenizing speed against a single-threaded
# process. A deeper cache serves nearly all of them (bench/RESULTS.md).
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "GLIBC_TUNABLES": "glibc.malloc.tcache_count=1000"}


def connect(address: str | None = None) -> None:
    if ray.is_initialized():
        return
    ray_internals.check_ray_version()  # another Ray: one clear message now, not a missing part later
    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(
        address=address,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env={"env_vars": WORKER_ENV},
    )
    # The stage's own lines say what the cluster's error messages mean for the run (`resumed from
    # step N`): the messages themselves go to the log file.
    ray_internals.send_ray_errors_to(log)
    if threading.current_thread() is threading.main_thread():
        # ray.init installs a SIGTERM handler that exits at once; the caller's (the CLI marks the
        # run record stopped) must survive it.
        signal.signal(signal.SIGTERM, on_sigterm)
    log.info("connected to Ray %s (session logs: %s)", address or "embedded", ray_internals.session_dir() or "remote")


def disconnect() -> None:
    """Leave Ray: an embedded instance stops with its processes; on a cluster, the tasks and actors
    this driver owns (its stages' work) are ended by the cluster once it has gone."""
    if ray.is_initialized():
        ray.shutdown()


@dataclass
class ClusterView:
    total: dict[str, float]  # schedulable now
    nodes: list[dict[str, float]]  # each alive node's
    node_types: dict[str, dict[str, float]] = field(default_factory=dict)  # what the autoscaler can add
    most: dict[str, float] | None = None  # what the autoscaler may scale the cluster to

    @property
    def autoscaling(self) -> bool:
        return bool(self.node_types)


def capacity(autoscaler: bool = True) -> ClusterView:
    """The cluster as the scheduler sees it, without Ray's bookkeeping keys; with its autoscaler's
    node types when it has one (a cluster launched from a config, or KubeRay's) and `autoscaler`."""
    alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    view = ClusterView(_schedulable(ray.cluster_resources()), [_schedulable(r) for r in alive])
    head = next((_schedulable(r) for r in alive if "node:__internal_head__" in r), None)
    # An embedded Ray has no autoscaler: no need to look for one.
    found = autoscaler_config.discover(head) if autoscaler and not ray_internals.started_here() else None
    if found:
        view.node_types, view.most = found.shapes, found.most
    return view


def _schedulable(resources) -> dict[str, float]:
    """Without Ray's bookkeeping: node markers, memory, and placement groups' reserved shares."""
    return {k: float(v) for k, v in dict(resources).items()
            if not k.startswith("node:") and "_group_" not in k and k not in ("memory", "object_store_memory")}


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for exactly these bundles (it replaces the previous request; [] releases
    it, so idle nodes can go away)."""
    from ray.autoscaler.sdk import request_resources as request

    request(bundles=bundles)


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
