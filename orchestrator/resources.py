"""Resource decisions for the scheduler, apart from Ray so that they are unit-tested without one.

Each stage asks for a list of bundles (one per worker: {"CPU": 1, "GPU": 1}). The runner starts a
stage only when the sum of its bundles fits in what the stages already running leave free, so
concurrent stages never oversubscribe the cluster; and before anything starts it refuses a stage
that no cluster state could ever hold (a bundle larger than any node, or a sum larger than the
cluster), instead of letting Ray wait for it forever.
"""

from __future__ import annotations

from collections import Counter

Resources = dict[str, float]
DEFAULT_BUNDLES = [{"CPU": 1.0}]  # driver-side stages whose Ray tasks queue for CPUs as they free up


def total(bundles: list[Resources]) -> Resources:
    out: Counter = Counter()
    for bundle in bundles:
        out.update(bundle)
    return dict(out)


def fits(need: Resources, free: Resources) -> bool:
    return all(free.get(k, 0.0) >= v - 1e-9 for k, v in need.items() if v)


def subtract(free: Resources, need: Resources) -> Resources:
    return {k: free.get(k, 0.0) - need.get(k, 0.0) for k in free.keys() | need.keys()}


def add(free: Resources, need: Resources) -> Resources:
    return {k: free.get(k, 0.0) + need.get(k, 0.0) for k in free.keys() | need.keys()}


def never_fits(name: str, bundles: list[Resources], cluster: Resources, nodes: list[Resources]) -> str | None:
    """Why stage `name` could never start on this cluster, or None."""
    need = total(bundles)
    for resource, amount in sorted(need.items()):
        if amount and cluster.get(resource, 0.0) < amount:
            fix = "set use_gpu: false or add GPU nodes" if resource == "GPU" and not cluster.get("GPU") else \
                "lower num_workers or add nodes"
            return (f"stages.{name}: needs {amount:g} {resource} in all ({len(bundles)} x {_fmt(bundles[0])}), but the "
                    f"cluster has {cluster.get(resource, 0.0):g} {resource}; {fix}")
    for bundle in bundles:
        if nodes and not any(fits(bundle, node) for node in nodes):
            largest = ", ".join(_fmt(node) for node in nodes)
            return (f"stages.{name}: one worker needs {_fmt(bundle)}, but no node is that large (nodes: {largest}); "
                    f"lower cpus_per_worker or add larger nodes")
    return None


def _fmt(resources: Resources) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if v) + "}"
