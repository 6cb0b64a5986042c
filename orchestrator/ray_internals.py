"""Every use that the orchestrator and its jobs make of Ray's private parts (`ray._private`,
`ray._raylet`, the autoscaler's internals), in one file.

Ray 2.60 has no public API for what these give the orchestrator: keeping Ray's error messages
out of the terminal, the session log directory, whether this process started the cluster, the
autoscaler's node types (from the GCS, from KubeRay's RayCluster, or from the head's monitor
process), whether a Ray token is configured, and the name of Ray Train's checkpoint list in a
run's directory. Private parts change without notice between Ray releases, so they are named here
only: upgrading Ray means reading this file against the new release, moving SUPPORTED_RAY (and
the ray pin in pyproject.toml and the Dockerfile's base image) to it, and running
tests/test_ray_internals.py, which looks up every part named here.

Another Ray version is refused where Ray is first used (`check_ray_version`), with the fix. A
private part that is missing all the same (a patch release that moved it) is an UnsupportedRay
naming it, not an AttributeError from deep inside a run; where it is only a convenience (the
error-message hook, a log line's session directory), a warning in the log instead.

Nothing here imports Ray when this module is imported: the CLI's commands that never touch Ray
stay fast.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import UserError

log = logging.getLogger(__name__)

SUPPORTED_RAY = "2.60"
"""The Ray release (major.minor) whose private parts this file was written against."""
INSTALL_SUPPORTED_RAY = f"pip install 'ray[default,train]=={SUPPORTED_RAY}.0'"

_NODE = "ray._private.worker:_global_node"  # this process's Ray node; None without a local one
_PRINTER = "ray._private.worker:print_to_stdstream"
_MONITOR_SCRIPTS = ("autoscaler/_private/monitor.py", "autoscaler/v2/monitor.py")
"""The scripts a head node runs as the autoscaler's monitor process (v1, v2)."""
_TRAIN_SNAPSHOT = "ray.train.v2._internal.constants:CHECKPOINT_MANAGER_SNAPSHOT_FILENAME"


class UnsupportedRay(UserError):
    """The installed Ray is not the one this orchestrator was written for. The fix is installing
    that one, so it is bad input (exit 2), not a bug."""


# --- the version, and finding a private part ----------------------------------------------------

def check_ray_version(installed: str | None = None) -> None:
    """Refuse a Ray whose major.minor is not SUPPORTED_RAY. `installed`: the version to judge,
    the installed Ray's by default."""
    installed = installed or _installed_ray()
    if ".".join(installed.split(".")[:2]) != SUPPORTED_RAY:
        raise UnsupportedRay(f"Ray {installed} is installed, but this orchestrator supports Ray {SUPPORTED_RAY} "
                             f"only (it uses parts of Ray that change between releases); {INSTALL_SUPPORTED_RAY}")


def internal(path: str) -> Any:
    """The private part of Ray at `path`, "module:attribute.attribute" (or a bare module), or an
    UnsupportedRay naming it."""
    module_name, _, attributes = path.partition(":")
    try:
        owner = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        # A dependency missing inside the module is another problem, with its own message.
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise
        raise _missing(module_name) from None
    owner_path = module_name
    for name in attributes.split(".") if attributes else []:
        owner = attribute_of(owner, name, owner_path)
        owner_path = f"{owner_path}.{name}"
    return owner


def attribute_of(owner: object, name: str, owner_path: str) -> Any:
    """`owner.name`, or an UnsupportedRay naming `owner_path.name` (for objects Ray hands out,
    such as its node)."""
    try:
        return getattr(owner, name)
    except AttributeError:
        raise _missing(f"{owner_path}.{name}") from None


def _missing(path: str) -> UnsupportedRay:
    what = path.replace(":", ".")  # as Python spells it
    return UnsupportedRay(f"{what} is not in the installed Ray {_installed_ray()}: this orchestrator uses that "
                          f"private part of Ray {SUPPORTED_RAY}; {INSTALL_SUPPORTED_RAY}")


def _installed_ray() -> str:
    import ray

    return ray.__version__


# --- the driver's Ray --------------------------------------------------------------------------

def send_ray_errors_to(target: logging.Logger) -> None:
    """Ray prints the cluster's error messages (a node that died, with a screenful of its raylet's
    state) straight to the driver's stdout, whatever `log_to_driver` says: replace its printer
    with one that writes them to `target` as warnings."""
    try:
        internal(_PRINTER)  # set where Ray no longer calls it, a printer would do nothing, silently
    except UnsupportedRay as e:
        log.warning("Ray's error messages will reach the terminal: %s", e)
        return
    internal("ray._private.worker").print_to_stdstream = lambda data, ignore_prefix=False: target.warning(
        "ray (%s): %s", data.get("pid"), "\n".join(data.get("lines", [])))


def session_dir() -> str | None:
    """Where this process's Ray node keeps its session logs; None without a local node (a Ray
    Client connection), or, with a warning, where this Ray does not say (only a log line needs it)."""
    try:
        node = internal(_NODE)
        return attribute_of(node, "get_session_dir_path", _NODE)() if node is not None else None
    except UnsupportedRay as e:
        log.warning("cannot tell Ray's session directory: %s", e)
        return None


def started_here() -> bool:
    """Whether this process started the Ray cluster it is connected to (an embedded Ray)."""
    node = internal(_NODE)
    return node is not None and bool(attribute_of(node, "head", _NODE))


# --- Ray Train ---------------------------------------------------------------------------------

def train_snapshot_name() -> str:
    """The file in a Ray Train run's directory that lists the checkpoints reported to it (Ray
    Train reads it when a run with that directory starts)."""
    return internal(_TRAIN_SNAPSHOT)


# --- the autoscaler's configuration ------------------------------------------------------------

@dataclass(frozen=True)
class NodeGroup:
    """A node type as the autoscaler reported it to the GCS."""

    name: str
    resources: dict[str, float]  # one node's
    max_count: int  # 0: none may be added; -1: no limit


def node_groups_from_gcs() -> list[NodeGroup]:
    """The node groups the cluster's autoscaler reported to the GCS; [] when it reported none."""
    config = internal("ray._private.state:state.get_cluster_config")()
    return [NodeGroup(g.name, {k: float(v) for k, v in g.resources.items()}, g.max_count)
            for g in (config.node_group_configs if config else [])]


def max_resources_from_gcs() -> dict[str, float]:
    """The cluster at its largest, as Ray computes it from the autoscaler's report."""
    most = internal("ray._private.state:state.get_max_resources_from_cluster_config")()
    return {k: float(v) for k, v in (most or {}).items()}


def kuberay_autoscaling_config(cluster_name: str, namespace: str) -> dict:
    """The autoscaling config that KubeRay's autoscaler derives from the RayCluster resource
    `namespace/cluster_name` (read from the Kubernetes API with this pod's service account)."""
    producer = internal("ray.autoscaler._private.kuberay.autoscaling_config:AutoscalingConfigProducer")
    return producer(cluster_name, namespace)()


def monitor_config_path(gcs_address: str) -> str | None:
    """On a head node: the `--autoscaling-config` file of the autoscaler's monitor process serving
    the cluster at `gcs_address` (a machine may run several clusters); None without one."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        if not any(a.endswith(_MONITOR_SCRIPTS) for a in args) or f"--gcs-address={gcs_address}" not in args:
            continue
        for arg in args:
            if arg.startswith("--autoscaling-config="):
                return os.path.expanduser(arg.split("=", 1)[1])
    return None


# --- the token ---------------------------------------------------------------------------------

def token_configured() -> bool:
    """Whether Ray's settings hold a token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token), whatever RAY_AUTH_MODE says."""
    loader = internal("ray._raylet:AuthenticationTokenLoader.instance")()
    return attribute_of(loader, "has_token", "ray._raylet.AuthenticationTokenLoader")(ignore_auth_mode=True)


def reload_ray_config() -> None:
    """Ray reads its settings (RAY_AUTH_MODE among them) from the environment once, when it is
    imported: read them again after a change to os.environ."""
    internal("ray._raylet:Config.initialize")("")
