"""Resource decisions for the scheduler, apart from Ray so that they are unit-tested without one.

Each stage asks for a list of bundles (one per worker: {"CPU": 1, "GPU": 1}). The runner starts a
stage only when the sum of its bundles fits in what the stages already running leave free, so
concurrent stages never oversubscribe the cluster; and before anything starts it refuses a stage
that no cluster state could ever hold (a bundle larger than any node and any node type the
autoscaler can add, or a sum larger than the cluster can grow to), instead of letting Ray wait for
it forever. On an autoscaling cluster "the cluster" is what its autoscaler may scale it to.
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


def ceiling(current: Resources, most: Resources | None) -> Resources:
    """What the cluster can reach: its resources now, or more if its autoscaler may add nodes."""
    return {k: max(current.get(k, 0.0), (most or {}).get(k, 0.0)) for k in current.keys() | (most or {}).keys()}


def never_fits(name: str, bundles: list[Resources], cluster: Resources, nodes: list[Resources],
               node_types: dict[str, Resources] | None = None) -> str | None:
    """Why stage `name` could never start on this cluster (`cluster`: the most it can reach;
    `node_types`: the autoscaler's, by name), or None."""
    need = total(bundles)
    for resource, amount in sorted(need.items()):
        if amount and cluster.get(resource, 0.0) < amount:
            if cluster.get(resource):
                fix = "lower num_workers or add nodes"
            elif resource == "GPU":
                fix = "set use_gpu: false or add GPU nodes"
            else:
                fix = f"add a node type that offers {resource}, or drop it from resources_per_worker"
            return (f"stages.{name}: needs {amount:g} {resource} in all ({len(bundles)} x {describe(bundles[0])}), but the "
                    f"cluster has {cluster.get(resource, 0.0):g} {resource}; {fix}")
    shapes = nodes + list((node_types or {}).values())
    for bundle in bundles:
        if shapes and not any(fits(bundle, shape) for shape in shapes):
            listed = f"nodes: {', '.join(describe(node) for node in nodes)}"
            if node_types:
                listed += f"; node types: {', '.join(f'{t} {describe(r)}' for t, r in sorted(node_types.items()))}"
            return (f"stages.{name}: one worker needs {describe(bundle)}, but no node is that large ({listed}); "
                    f"lower cpus_per_worker or add larger nodes")
    return None


def describe(resources: Resources) -> str:
    """{CPU: 2, GPU: 1}: the nonzero amounts, for messages."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if v) + "}"
