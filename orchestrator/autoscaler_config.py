"""Which nodes a cluster's autoscaler may add: its node types (resources of one node each) and how
many of each, so the runner can tell a stage that must wait for nodes from one that never fits.

Ray 2.60 has no public API for this, so it is read where the autoscaler itself reads it, on the
head node (a zero-CPU task placed there):
- a cluster-launcher cluster (`ray up`): the autoscaling config file the head's monitor process was
  started with (`--autoscaling-config=PATH`);
- KubeRay: the RayCluster resource, derived into a config by Ray's own KubeRay code (the head
  pod's service account may read it: the autoscaler sidecar uses the same one).
Newer Ray versions report the config to the GCS (`state.get_cluster_config()`); that comes first.
Each of these reads a private part of Ray, through `orchestrator.ray_internals`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import ray

from orchestrator import ray_internals

log = logging.getLogger(__name__)

Resources = dict[str, float]
_K8S_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


@dataclass(frozen=True)
class NodeTypes:
    shapes: dict[str, Resources]  # worker node type -> the resources of one such node
    most: Resources  # the cluster at its largest: the head and every type at its max_workers


def from_config(config: dict, head: Resources | None = None) -> NodeTypes | None:
    """The worker node types of an autoscaling config (launcher YAML or KubeRay-derived), or None
    when it can add no worker node. `head`: the head node's actual resources, which Ray may have
    detected rather than read from the config."""
    types = config.get("available_node_types") or {}
    default_max = config.get("max_workers", 2)  # Ray's default for a type without its own
    shapes, most = {}, {}
    for name, node_type in types.items():
        resources = {k: float(v) for k, v in (node_type.get("resources") or {}).items()
                     if k not in ("memory", "object_store_memory")}
        if name == config.get("head_node_type"):
            resources, count = head if head is not None else resources, 1
        else:
            count = int(node_type.get("max_workers", default_max))
            if count > 0:
                shapes[name] = resources
        for k, v in resources.items():
            most[k] = most.get(k, 0.0) + v * count
    return NodeTypes(shapes, most) if shapes else None


def from_gcs() -> NodeTypes | None:
    """What the autoscaler reported to the GCS (Ray versions whose autoscaler does)."""
    groups = [g for g in ray_internals.node_groups_from_gcs() if g.max_count != 0]
    if not groups:
        return None
    return NodeTypes({g.name: g.resources for g in groups}, ray_internals.max_resources_from_gcs())


def discover(head: Resources | None = None) -> NodeTypes | None:
    """The autoscaler's node types, or None for a cluster without an autoscaler (or one whose
    config cannot be read: then the runner judges stages by the nodes there are)."""
    found = from_gcs()
    if found is None:
        reader = ray.remote(num_cpus=0, resources={"node:__internal_head__": 0.001}, max_retries=0)(_read_on_head)
        config = ray.get(reader.remote(), timeout=60)
        found = from_config(config, head) if config else None
    log.info("autoscaler node types: %s", found.shapes if found else "none (no autoscaler config found)")
    return found


def _read_on_head() -> dict | None:
    """On the head node: the config of this cluster's autoscaler, from its monitor's command line
    or from the RayCluster resource on KubeRay."""
    gcs_address = ray.get_runtime_context().gcs_address
    path = ray_internals.monitor_config_path(gcs_address)
    if path:
        import yaml

        with open(path) as f:  # `ray up` writes it as JSON, which YAML reads too
            return yaml.safe_load(f)
    cluster_name = os.environ.get("RAY_CLUSTER_NAME")
    if cluster_name and os.environ.get("KUBERNETES_SERVICE_HOST") and os.path.exists(_K8S_NAMESPACE_FILE):
        with open(_K8S_NAMESPACE_FILE) as f:
            namespace = f.read().strip()
        try:
            return ray_internals.kuberay_autoscaling_config(cluster_name, namespace)
        except ray_internals.UnsupportedRay:  # not the cluster's doing: the fix is another Ray
            raise
        except Exception:  # no permission, no API: judge by the nodes there are
            log.warning("could not read RayCluster %s/%s", namespace, cluster_name, exc_info=True)
    return None

