"""Static checks of the manifests `orchestrator.render` makes from a pipeline's `schedule:`: the
fields Kubernetes and KubeRay require, the schedule's policy carried over, the pipeline file
mounted where the command reads it, non-root pods, no keys. No cluster."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from orchestrator.errors import UserError
from orchestrator.render import render_kuberay
from orchestrator.spec import parse_spec

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL", re.I)


def _pipeline(tmp_path, name="nightly.yaml", **schedule):
    """examples/demo.yaml on S3 with a schedule: (path, its text, its spec)."""
    raw = yaml.safe_load((ROOT / "examples" / "demo.yaml").read_text())
    raw["storage"] = "s3://bucket/prefix"
    raw["schedule"] = {"cron": "30 2 * * *", "timezone": "Europe/Berlin", **schedule}
    path = tmp_path / name
    path.write_text("# the demo, nightly\n" + yaml.safe_dump(raw))
    return str(path), path.read_text(), parse_spec(path.read_text(), str(path))


def _render(tmp_path, kind="cronjob", **schedule):
    path, text, spec = _pipeline(tmp_path, **schedule)
    docs = [d for d in yaml.safe_load_all(render_kuberay(path, spec, kind=kind)) if d]
    return docs, text, spec


def _one(docs, kind):
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def _scheduler(docs):
    return _one(docs, "CronJob") if any(d["kind"] == "CronJob" for d in docs) else _one(docs, "RayCronJob")


def _pod(docs) -> dict:
    """The pod that runs `orchestrator schedule`: the CronJob's, or the RayJob's head."""
    spec = _scheduler(docs)["spec"]
    if "rayClusterSpec" in spec["jobTemplate"]:
        return spec["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    return spec["jobTemplate"]["spec"]["template"]["spec"]


def _command(docs) -> list[str]:
    spec = _scheduler(docs)["spec"]
    if "entrypoint" in spec["jobTemplate"]:
        return shlex.split(spec["jobTemplate"]["entrypoint"])
    return _pod(docs)["containers"][0]["command"]


KINDS = ["cronjob", "raycronjob"]


@pytest.mark.parametrize("kind", KINDS)
def test_documents_carry_the_fields_kubernetes_requires(tmp_path, kind):
    docs, _, _ = _render(tmp_path, kind)
    assert [d["kind"] for d in docs] == ["ConfigMap", {"cronjob": "CronJob", "raycronjob": "RayCronJob"}[kind]]
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"]
        assert DNS_1123.fullmatch(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 52
    scheduler = _scheduler(docs)
    assert scheduler["apiVersion"] == {"cronjob": "batch/v1", "raycronjob": "ray.io/v1"}[kind]
    assert scheduler["spec"]["schedule"] == "30 2 * * *"
    assert scheduler["spec"]["timeZone"] == "Europe/Berlin"
    assert scheduler["spec"]["jobTemplate"]
    for container in _pod(docs)["containers"]:
        assert container["name"] and container["image"] == "ghcr.io/ORG/ray-llm-orchestrator:latest"
    assert _command(docs)[:2] == ["orchestrator", "schedule"]


def test_cronjob_pod_fires_one_tick_against_the_cluster(tmp_path):
    docs, _, _ = _render(tmp_path)
    job = _one(docs, "CronJob")["spec"]
    assert job["jobTemplate"]["spec"]["backoffLimit"] == 0
    assert job["successfulJobsHistoryLimit"] >= 0 and job["failedJobsHistoryLimit"] >= 0
    pod = _pod(docs)
    assert pod["restartPolicy"] == "Never"
    assert _command(docs) == ["orchestrator", "schedule", "/pipeline/nightly.yaml", "--once",
                              "--address", "http://llm-pipeline-head-svc:8265", "--storage", "s3://bucket/prefix"]
    # The token comes from the Secret KubeRay keeps for raycluster.yaml's cluster, by reference.
    (env,) = pod["containers"][0]["env"]
    assert env["name"] == "RAY_AUTH_TOKEN" and "value" not in env
    assert env["valueFrom"]["secretKeyRef"] == {"name": "llm-pipeline", "key": "auth_token"}


def test_raycronjob_runs_the_driver_on_its_own_copy_of_the_raycluster(tmp_path):
    docs, _, _ = _render(tmp_path, "raycronjob")
    job = _one(docs, "RayCronJob")["spec"]["jobTemplate"]
    assert "spec" not in job and "clusterSelector" not in job  # a RayJob spec itself, unwrapped
    assert _command(docs) == ["orchestrator", "schedule", "/pipeline/nightly.yaml", "--once",
                              "--storage", "s3://bucket/prefix"]
    # KubeRay pastes the entrypoint into the submitter's shell command.
    assert not re.search(r"&&|\|\||[;|<>`]", job["entrypoint"])
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] >= 0
    # raycluster.yaml's spec, with the pipeline file mounted into the head that runs the driver.
    cluster = job["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    head.pop("volumes")
    head["containers"][0].pop("volumeMounts")
    (reference,) = yaml.safe_load_all((KUBERAY / "raycluster.yaml").read_text())
    assert cluster == reference["spec"]
    assert DNS_1035.fullmatch(_one(docs, "RayCronJob")["metadata"]["name"])


@pytest.mark.parametrize("kind", KINDS)
def test_the_configmap_holds_the_pipeline_where_the_command_reads_it(tmp_path, kind):
    docs, text, _ = _render(tmp_path, kind)
    config_map = _one(docs, "ConfigMap")
    assert config_map["data"] == {"nightly.yaml": text}
    pod = _pod(docs)
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    (mount,) = [m for c in pod["containers"] for m in c.get("volumeMounts", []) if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    spec_arg = _command(docs)[2]
    assert spec_arg == f"{mount['mountPath']}/nightly.yaml"


@pytest.mark.parametrize("kind", KINDS)
def test_pods_run_as_non_root_with_the_service_account(tmp_path, kind):
    docs, _, _ = _render(tmp_path, kind)
    (account,) = yaml.safe_load_all((KUBERAY / "serviceaccount.yaml").read_text())
    pods = [_pod(docs)]
    if kind == "raycronjob":
        pods += [g["template"]["spec"] for g in _scheduler(docs)["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pods:
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("kind", KINDS)
def test_no_keys_or_tokens_anywhere(tmp_path, kind):
    path, _, spec = _pipeline(tmp_path)
    text = render_kuberay(path, spec, kind=kind)
    key = re.compile(r"aws_access_key_id|aws_secret_access_key|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", re.I)
    assert not key.search(text)

    def env_entries(node):
        if isinstance(node, dict):
            yield from node.get("env", [])
            for value in node.values():
                yield from env_entries(value)
        elif isinstance(node, list):
            for item in node:
                yield from env_entries(item)

    for doc in yaml.safe_load_all(text):
        for env in env_entries(doc):
            assert not (SECRET_NAME.search(env["name"]) and "value" in env), env


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("overlap, max_active_runs, policy", [
    ("skip", 1, "Forbid"), ("queue", 1, "Forbid"), ("cancel", 1, "Replace"),
    ("skip", 3, "Allow"), ("queue", 3, "Allow"), ("cancel", 3, "Allow"),
])
def test_concurrency_policy_follows_overlap(tmp_path, kind, overlap, max_active_runs, policy):
    docs, _, _ = _render(tmp_path, kind, overlap=overlap, max_active_runs=max_active_runs)
    scheduler = _scheduler(docs)
    if kind == "cronjob":
        assert scheduler["spec"]["concurrencyPolicy"] == policy
    else:  # RayCronJob has no such field yet; kubectl's strict validation would refuse one
        assert "concurrencyPolicy" not in scheduler["spec"]
        assert scheduler["metadata"]["annotations"]["ray-llm-orchestrator/concurrency-policy"] == policy


@pytest.mark.parametrize("schedule, deadline", [
    ({"catchup": "none"}, 300),
    ({"catchup": "latest", "catchup_window": "3d"}, 3 * 86400),
    ({"catchup": "all", "catchup_window": "2h"}, 7200),
    ({"catchup": "none", "overlap": "queue", "catchup_window": "12h"}, 12 * 3600),  # a queued tick waits
    ({"catchup": "latest", "catchup_window": "30d", "cron": "*/5 * * * *"}, 99 * 300),  # < 100 missed ticks
    ({"catchup": "latest", "catchup_window": "10s"}, 300),
])
def test_starting_deadline_follows_catchup(tmp_path, schedule, deadline):
    docs, _, _ = _render(tmp_path, **schedule)
    assert _one(docs, "CronJob")["spec"]["startingDeadlineSeconds"] == deadline


def test_namespace_and_long_names(tmp_path):
    path, _, spec = _pipeline(tmp_path)
    spec = spec.model_copy(update={"name": "9-" + "very-long-pipeline-name-" * 4 + "x"})
    docs = list(yaml.safe_load_all(render_kuberay(path, spec, kind="raycronjob", namespace="ml")))
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}
    for doc in docs:
        assert DNS_1035.fullmatch(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 52
    assert _pod(docs)["volumes"][0]["configMap"]["name"] == _one(docs, "ConfigMap")["metadata"]["name"]


def test_storage_override_goes_onto_the_command_line(tmp_path):
    path, text, spec = _pipeline(tmp_path)
    spec = spec.model_copy(update={"storage": "s3://other/place"})
    docs = list(yaml.safe_load_all(render_kuberay(path, spec)))
    assert _command(docs)[-2:] == ["--storage", "s3://other/place"]
    assert _one(docs, "ConfigMap")["data"]["nightly.yaml"] == text


def test_no_schedule_is_refused(tmp_path):
    path, _, spec = _pipeline(tmp_path)
    with pytest.raises(UserError, match=r"`schedule:`"):
        render_kuberay(path, spec.model_copy(update={"schedule": None}))


def test_local_storage_is_refused(tmp_path):
    path, _, spec = _pipeline(tmp_path)
    with pytest.raises(UserError, match=r"storage 'file://\./\.orchestrator'.*--storage s3://"):
        render_kuberay(path, spec.model_copy(update={"storage": "file://./.orchestrator"}))


def test_unknown_kind_is_refused(tmp_path):
    path, _, spec = _pipeline(tmp_path)
    with pytest.raises(UserError, match="cronjob, raycronjob"):
        render_kuberay(path, spec, kind="deployment")
