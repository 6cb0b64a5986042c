"""A pipeline's `schedule:` as Kubernetes manifests, for scheduling in production on KubeRay.

Two kinds, each a ConfigMap with the pipeline file plus the object that fires its ticks:

- `cronjob` (any cluster; Kubernetes >= 1.27 for `timeZone`): a `batch/v1` CronJob whose small pod
  runs `orchestrator schedule /pipeline/FILE --once --address URL --storage URI` against a
  long-lived RayCluster (cluster/kuberay/raycluster.yaml). The pod only claims the tick and submits
  the run's driver; the run itself lives on the Ray cluster.
- `raycronjob` (KubeRay alpha, the `RayCronJob` feature gate; `timeZone` needs KubeRay >= 1.7): a
  RayCronJob whose every tick is a RayJob with its own Ray cluster (as cluster/kuberay/rayjob.yaml),
  whose entrypoint `orchestrator schedule /pipeline/FILE --once --storage URI` runs the driver on
  that cluster and waits for it; the cluster goes when the job ends.

Either way `orchestrator schedule` reads the same `schedule:` section again and decides what each
tick does: it claims the tick create-only in storage and submits under a run id derived from it, so
a repeated or concurrent invocation starts nothing twice, and it applies `overlap`, `catchup` and
`max_active_runs` from its run records. The Kubernetes fields below only mirror that policy, so
Kubernetes does not pile up pods the scheduler would turn away anyway:

  schedule                      CronJob / RayCronJob
  ----------------------------  ------------------------------------------------------------------
  cron, timezone                spec.schedule, spec.timeZone
  overlap skip                  concurrencyPolicy Forbid: no new pod while the last one runs
  overlap queue                 concurrencyPolicy Forbid, and a startingDeadlineSeconds as long as
                                the catch-up window: Kubernetes counts a tick skipped under Forbid
                                as missed and starts it once the previous pod ends, if within it
  overlap cancel                concurrencyPolicy Replace
  max_active_runs > 1           concurrencyPolicy Allow, whatever `overlap` says: the scheduler
                                counts active runs itself, and Replace would end a run early
  catchup none                  startingDeadlineSeconds 300: a pod more than 5 minutes late is not
                                started (the scheduler would fire nothing for it)
  catchup latest / all          startingDeadlineSeconds = catchup_window, capped at 99 ticks of the
                                cron (past 100 missed ticks the CronJob controller stops starting)

RayCronJob (KubeRay 1.6 / 1.7) has no concurrencyPolicy, startingDeadlineSeconds or history limits
yet: its CRD holds `schedule`, `timeZone` (1.7), `suspend` and `jobTemplate` (a RayJob spec, not
wrapped in metadata/spec). With strict field validation, kubectl refuses unknown fields, so the
concurrency policy it would take goes into an annotation instead, and every tick makes a RayJob
whose `orchestrator schedule` applies `overlap` itself: a tick it skips costs a CPU head pod for
as long as the cluster takes to start.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shlex
from datetime import datetime
from urllib.parse import urlparse

import yaml

from orchestrator.errors import UserError
from orchestrator.schedule_spec import ScheduleSpec
from orchestrator.scheduler import ON_TIME
from orchestrator.spec import PipelineSpec

KINDS = ("cronjob", "raycronjob")
IMAGE = "ghcr.io/ORG/ray-llm-orchestrator:latest"
"""As in cluster/kuberay/*.yaml; ORG is where you pushed the image."""
CLUSTER = "llm-pipeline"
"""The RayCluster of cluster/kuberay/raycluster.yaml: its head Service and its token Secret."""
ADDRESS = f"http://{CLUSTER}-head-svc:8265"
SERVICE_ACCOUNT = "ray-llm-orchestrator"
"""Its IRSA role is what lets the pods claim ticks and write runs in S3; no key is ever rendered."""
MOUNT = "/pipeline"
RAY_USER = 1000  # the image's `ray` user; a numeric id lets the kubelet verify non-root
ON_TIME_S = int(ON_TIME.total_seconds())  # the scheduler's own: a pod later than this fires nothing
MAX_MISSED_TICKS = 99
NAME_LIMIT = 40  # leaves room for the suffixes here and the ones CronJob / RayCronJob add to their jobs
POLICY_ANNOTATION = "ray-llm-orchestrator/concurrency-policy"
LABELS = {"app.kubernetes.io/part-of": "ray-llm-orchestrator"}


def render_kuberay(spec_path: str, spec: PipelineSpec, kind: str = "cronjob", image: str = IMAGE,
                   namespace: str | None = None, address: str = ADDRESS) -> str:
    """The manifests (multi-document YAML) that run `spec`'s schedule on Kubernetes. `spec` is
    the file at `spec_path` as loaded, with any --storage override already applied: the file's
    text goes into the ConfigMap as it is, the storage URI onto the command line."""
    if kind not in KINDS:
        raise UserError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if spec.schedule is None:
        raise UserError(f"{spec_path}: the pipeline has no `schedule:` section, so there is nothing to "
                        "schedule; add one, e.g. `schedule: {cron: \"30 2 * * *\", timezone: UTC}`")
    if not spec.storage.startswith("s3://"):
        raise UserError(f"{spec_path}: storage {spec.storage!r} is not s3://: a pod cannot see this machine's "
                        "files, and the scheduler keeps its claims and run records there; give "
                        "--storage s3://bucket/prefix or set `storage: s3://...` in the file")
    filename = os.path.basename(spec_path)
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", filename):
        raise UserError(f"{spec_path}: a ConfigMap key cannot be {filename!r}; rename the file to letters, "
                        "digits, '-', '_' and '.'")
    try:
        with open(spec_path) as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"{spec_path}: cannot read the pipeline file: {e.strerror}") from None

    base = _dns_name(spec.name)

    def meta(name: str, **extra) -> dict:
        return {"name": name, **({"namespace": namespace} if namespace else {}),
                "labels": {**LABELS, "app.kubernetes.io/instance": base}, **extra}

    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(f"{base}-pipeline"),
                  "data": {filename: text}}
    volume = {"name": "pipeline", "configMap": {"name": f"{base}-pipeline"}}
    mount = {"name": "pipeline", "mountPath": MOUNT, "readOnly": True}
    command = ["orchestrator", "schedule", f"{MOUNT}/{filename}", "--once"]
    schedule = spec.schedule
    policy = concurrency_policy(schedule)

    if kind == "cronjob":
        header = [f"Runs the schedule of {filename} ({schedule.cron}, {schedule.timezone}) against the Ray",
                  f"cluster at {address}; apply it in that cluster's namespace (Kubernetes >= 1.27)."]
        pod = _pod(image, [*command, "--address", address, "--storage", spec.storage], address)
        pod["volumes"] = [volume]
        pod["containers"][0]["volumeMounts"] = [mount]
        scheduler = {
            "apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta(f"{base}-schedule"),
            "spec": {
                "schedule": schedule.cron, "timeZone": schedule.timezone,
                "concurrencyPolicy": policy,
                "startingDeadlineSeconds": starting_deadline_seconds(schedule),
                "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3,
                "jobTemplate": {"spec": {
                    # The pipeline resumes itself on the next tick, and a retried pod would only
                    # fire the same tick again (harmless, the claim holds, but noisy).
                    "backoffLimit": 0,
                    # The pod claims and submits, minutes at most: one that hangs (cluster out of
                    # reach) must not hold back every later tick under Forbid.
                    "activeDeadlineSeconds": 3600,
                    "template": {"metadata": {"labels": {**LABELS, "app.kubernetes.io/instance": base}},
                                 "spec": pod},
                }},
            },
        }
    else:
        header = [f"Runs the schedule of {filename} ({schedule.cron}, {schedule.timezone}) as one RayJob",
                  "per tick. Needs the KubeRay operator with --feature-gates=RayCronJob=true, and",
                  "KubeRay >= 1.7 for spec.timeZone. RayCronJob has no concurrencyPolicy yet: the one",
                  f"this schedule maps to ({policy}) is the {POLICY_ANNOTATION} annotation."]
        cluster = ray_cluster_spec(image)
        head = cluster["headGroupSpec"]["template"]["spec"]
        head["volumes"] = [volume]
        head["containers"][0]["volumeMounts"] = [mount]
        scheduler = {
            "apiVersion": "ray.io/v1", "kind": "RayCronJob",
            "metadata": meta(f"{base}-schedule", annotations={POLICY_ANNOTATION: policy}),
            "spec": {
                "schedule": schedule.cron, "timeZone": schedule.timezone,
                # A RayJob spec as in cluster/kuberay/rayjob.yaml; inside it the driver finds the
                # cluster through RAY_ADDRESS. No shell operators: KubeRay pastes the entrypoint
                # into the submitter's shell command.
                "jobTemplate": {
                    "entrypoint": shlex.join([*command, "--storage", spec.storage]),
                    "shutdownAfterJobFinishes": True,
                    "ttlSecondsAfterFinished": 600,
                    "rayClusterSpec": cluster,
                },
            },
        }
    comment = "".join(f"# {line}\n" for line in header)
    return comment + yaml.dump_all([config_map, scheduler], Dumper=_Dumper, sort_keys=False)


def concurrency_policy(schedule: ScheduleSpec) -> str:
    if schedule.max_active_runs > 1:
        return "Allow"
    return {"skip": "Forbid", "queue": "Forbid", "cancel": "Replace"}[schedule.overlap]


def starting_deadline_seconds(schedule: ScheduleSpec) -> int:
    if schedule.catchup == "none" and schedule.overlap != "queue":
        return ON_TIME_S
    window = min(int(schedule.window.total_seconds()), MAX_MISSED_TICKS * _shortest_gap_s(schedule))
    return max(ON_TIME_S, window)


def _shortest_gap_s(schedule: ScheduleSpec) -> int:
    """The shortest time between two ticks, over the next 200 (from a fixed date, so the output
    does not change from one render to the next)."""
    from croniter import croniter

    ticks = croniter(schedule.cron, datetime(2025, 1, 1, tzinfo=schedule.zone))
    times = [ticks.get_next(datetime) for _ in range(200)]
    return int(min((b - a).total_seconds() for a, b in zip(times, times[1:])))


def _dns_name(name: str) -> str:
    """The pipeline's name as the start of an object name: DNS-1035 (a letter first, as Services
    made from it need), short enough for the suffixes, unique by a hash when cut."""
    if not name[0].isalpha():
        name = f"p-{name}"
    if len(name) > NAME_LIMIT:
        name = f"{name[:NAME_LIMIT - 7].rstrip('-')}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"
    return name


def _security() -> tuple[dict, dict]:
    """(pod, container) security contexts, as in cluster/kuberay/*.yaml. No privilege escalation
    also disarms the base image's passwordless sudo."""
    return ({"runAsNonRoot": True, "runAsUser": RAY_USER, "seccompProfile": {"type": "RuntimeDefault"}},
            {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}})


def _pod(image: str, command: list[str], address: str) -> dict:
    pod_security, container_security = _security()
    container = {"name": "schedule", "image": image, "command": command,
                 "resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                               "limits": {"cpu": "1", "memory": "2Gi"}},
                 "securityContext": container_security}
    # KubeRay keeps a token-auth cluster's token in a Secret named after the cluster; the Jobs
    # client reads RAY_AUTH_TOKEN. Only a reference is rendered, never the token.
    host = (urlparse(address).hostname or "").split(".")[0]
    if host.endswith("-head-svc"):
        secret = host.removesuffix("-head-svc")
        container["env"] = [{"name": "RAY_AUTH_TOKEN",
                             "valueFrom": {"secretKeyRef": {"name": secret, "key": "auth_token"}}}]
    # The image's WORKDIR (/app) is where the pipeline's relative paths resolve.
    return {"serviceAccountName": SERVICE_ACCOUNT, "restartPolicy": "Never",
            "securityContext": pod_security, "containers": [container]}


def ray_cluster_spec(image: str) -> dict:
    """cluster/kuberay/raycluster.yaml's spec with `image` (tests/test_render.py keeps them equal;
    that file is not in the installed package). Comments on the choices are there."""
    pod_security, container_security = _security()
    return {
        "rayVersion": importlib.metadata.version("ray"),
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600},
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": {"spec": {
                "serviceAccountName": SERVICE_ACCOUNT, "securityContext": pod_security,
                "containers": [{
                    "name": "ray-head", "image": image,
                    "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}],
                    "resources": {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}},
                    "securityContext": container_security,
                }],
            }},
        },
        "workerGroupSpecs": [{
            "groupName": "gpu", "replicas": 0, "minReplicas": 0, "maxReplicas": 8, "rayStartParams": {},
            "template": {"spec": {
                "serviceAccountName": SERVICE_ACCOUNT, "securityContext": pod_security,
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{
                    "name": "ray-worker", "image": image,
                    "resources": {"requests": {"cpu": "44", "memory": "176Gi", "nvidia.com/gpu": "4"},
                                  "limits": {"cpu": "44", "memory": "176Gi", "nvidia.com/gpu": "4"}},
                    "securityContext": container_security,
                    "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                }],
                "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
            }},
        }],
    }


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (the pipeline file) as literal blocks, so the
    ConfigMap reads like the file; PyYAML falls back to quoting where a block cannot hold it.
    No anchors: the same security context in several pods is written out each time."""

    def ignore_aliases(self, data) -> bool:
        return True


_Dumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))
