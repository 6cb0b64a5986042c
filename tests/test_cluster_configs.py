"""Static checks of the deployment files: cluster/, Dockerfile, .dockerignore. No cluster, no
network, no Docker.

Cluster-launcher configs go through Ray's own schema and `validate_config`, on the config as
`ray up` prepares it before its first AWS call (the raw file lacks the defaults that
`validate_config` insists on, so the raw file is checked against the schema alone). KubeRay
manifests are checked for the fields KubeRay requires and for what this project relies on: GPUs
from zero, token auth, non-root pods, no keys anywhere. The Dockerfile must agree with
pyproject.toml on Ray, Python and torch.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.autoscaler_config import from_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, where pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_CONFIGS = sorted(CLUSTER.glob("*.yaml"))  # kuberay/ holds Kubernetes manifests instead

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
REQUIREMENTS = {r.name: r for r in map(Requirement, PYPROJECT["dependencies"])}
RAY_VERSION = str(REQUIREMENTS["ray"].specifier).removeprefix("==")


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _gpus(node_type: dict) -> int:
    return node_type.get("resources", {}).get("GPU", 0)


# --- Ray cluster launcher ----------------------------------------------------------------------

def test_there_is_a_launcher_config():
    assert LAUNCHER_CONFIGS, "no cluster-launcher YAML under cluster/"


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path):
    config = _load(path)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # unknown or misspelled keys fail here
    validate_config(prepare_config(copy.deepcopy(config)))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_head_takes_no_work(path):
    config = _load(path)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and _gpus(head) == 0


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_gpus_scale_from_zero_spot_first_with_an_equal_on_demand_type(path):
    config = _load(path)
    gpu_types = [t for t in config["available_node_types"].values() if _gpus(t) > 0]
    assert gpu_types and all(t.get("min_workers", 0) == 0 for t in gpu_types)

    def market(t):
        return t["node_config"].get("InstanceMarketOptions", {}).get("MarketType", "on-demand")

    spot = [t for t in gpu_types if market(t) == "spot"]
    on_demand = [t for t in gpu_types if market(t) == "on-demand"]
    assert spot and on_demand
    for s in spot:
        for o in on_demand:
            assert s["resources"] == o["resources"]
            assert s["node_config"]["InstanceType"] == o["node_config"]["InstanceType"]
            assert s.get("priority", 0) > o.get("priority", 0)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_the_runner_sees_the_launchers_worker_types_and_their_maximum(path):
    config = _load(path)
    found = from_config(config, head={"CPU": 8.0})
    workers = {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    assert set(found.shapes) == set(workers)
    assert all(found.shapes[name]["GPU"] == _gpus(t) for name, t in workers.items())
    assert found.most["GPU"] == sum(_gpus(t) * t["max_workers"] for t in workers.values())
    assert found.most["CPU"] == 8 + sum(t["resources"]["CPU"] * t["max_workers"] for t in workers.values())


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_nodes_get_aws_access_from_instance_profiles(path):
    for name, node_type in _load(path)["available_node_types"].items():
        assert "Arn" in node_type["node_config"].get("IamInstanceProfile", {}), name


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_keeps_token_auth_on_and_the_dashboard_private(path):
    config = _load(path)
    assert "--env=RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "/home/ray/.ray/auth_token" in config["file_mounts"]
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        assert not (world and rule.get("FromPort", 0) <= 8265 <= rule.get("ToPort", 65535)), rule


def test_no_aws_keys_anywhere_under_cluster():
    key = re.compile(r"aws_access_key_id|aws_secret_access_key|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", re.I)
    for path in sorted(p for p in CLUSTER.rglob("*") if p.is_file()):
        assert not key.search(path.read_text()), path


# --- KubeRay -----------------------------------------------------------------------------------

def _kuberay(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc]


def _pods(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"]["template"]["spec"],
            *(group["template"]["spec"] for group in cluster_spec["workerGroupSpecs"])]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert head["template"]["spec"]["containers"][0]["image"]

    groups = spec["workerGroupSpecs"]
    for group in groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"][0]["image"]
    gpu_groups = [g for g in groups
                  if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu_groups and all(g["minReplicas"] == 0 for g in gpu_groups)

    for pod in _pods(spec):
        assert pod["serviceAccountName"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_raycluster():
    (cluster,) = _kuberay("raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", cluster["metadata"]["name"])  # DNS-1035
    _check_cluster_spec(cluster["spec"])


def test_the_runner_sees_kuberays_gpu_group_as_ray_derives_it():
    # On KubeRay the runner reads the RayCluster through Ray's own derivation (the autoscaler's).
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    (cluster,) = _kuberay("raycluster.yaml")
    cluster["metadata"]["namespace"] = "ml"  # the API server fills it in
    found = from_config(_derive_autoscaling_config_from_ray_cr(cluster))
    (group,) = [g for g in cluster["spec"]["workerGroupSpecs"]
                if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert found.shapes[group["groupName"]]["GPU"] == gpus
    assert found.most["GPU"] == gpus * group["maxReplicas"]


def test_rayjob_runs_the_pipeline_on_its_own_copy_of_the_raycluster():
    (job,) = _kuberay("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("orchestrator run ") and "--storage s3://" in spec["entrypoint"]
    # KubeRay pastes the entrypoint into the submitter's shell command: an operator would split it there.
    assert not re.search(r"&&|\|\||[;|<>`]", spec["entrypoint"])
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert "clusterSelector" not in spec
    (cluster,) = _kuberay("raycluster.yaml")
    assert spec["rayClusterSpec"] == cluster["spec"]


def test_pods_run_as_the_service_account_that_carries_the_s3_role():
    (account,) = _kuberay("serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount"
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    (cluster,) = _kuberay("raycluster.yaml")
    assert {pod["serviceAccountName"] for pod in _pods(cluster["spec"])} == {account["metadata"]["name"]}


# --- Dockerfile and .dockerignore --------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with comments dropped and continuation lines joined."""
    text = re.sub(r"\\\n", " ", re.sub(r"(?m)^\s*#.*\n", "", (ROOT / "Dockerfile").read_text()))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip()]


def test_dockerfile_base_image_matches_pyproject():
    (base,) = [args for op, args in _instructions() if op == "FROM"]
    match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", base)
    assert match, base
    assert match[1] == RAY_VERSION
    assert f"{match[2]}.{match[3]}" in SpecifierSet(PYPROJECT["requires-python"])


def test_dockerfile_installs_a_pinned_torch_then_deepspeed_against_it():
    runs = [args for op, args in _instructions() if op == "RUN"]
    (torch_pin,) = {m for run in runs for m in re.findall(r"\btorch==([\w.+]+)", run)}
    assert torch_pin in REQUIREMENTS["torch"].specifier
    install = " ".join(runs)
    deepspeed = install.index("deepspeed")
    assert install.index("torch==") < deepspeed
    assert "--no-build-isolation" in install[install.rindex("pip install", 0, deepspeed):deepspeed]


def test_dockerfile_runs_as_non_root_and_holds_no_secrets():
    instructions = _instructions()
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    secret = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AWS_", re.I)
    for op, args in instructions:
        if op in ("ARG", "ENV"):
            assert not secret.search(re.split(r"[=\s]", args, maxsplit=1)[0]), (op, args)


def _dockerignore() -> list[tuple[bool, re.Pattern]]:
    """(is an exception, regex) per rule, with Docker's glob meaning: `*` stays within a path
    segment, `**` crosses them."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        glob = line.lstrip("!").strip("/")
        regex = re.sub(r"\\\*\\\*/|\\\*\\\*|\\\*|\\\?", lambda m: {
            r"\*\*/": "(?:.*/)?", r"\*\*": ".*", r"\*": "[^/]*", r"\?": "[^/]"}[m[0]], re.escape(glob))
        rules.append((exception, re.compile(regex)))
    return rules


def _excluded(path: str) -> bool:
    """Docker's rule: the last rule matching the path or one of its parent directories decides."""
    parts = path.split("/")
    excluded = False
    for exception, regex in _dockerignore():
        if any(regex.fullmatch("/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not exception
    return excluded


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".git/HEAD", ".orchestrator/runs/x/run.json", "bench/.data/corpus.jsonl",
    "bench/.out/result.json", "ray_llm_orchestrator.egg-info/PKG-INFO", ".whl/x.whl",
    ".pytest_cache/v/cache", "tests/test_spec.py", "orchestrator/__pycache__/cli.cpython-311.pyc",
    ".env", "Makefile",
])
def test_dockerignore_keeps_local_state_out_of_the_build(path):
    assert _excluded(path)


def test_dockerignore_lets_in_everything_the_dockerfile_copies():
    sources = [src for op, args in _instructions() if op == "COPY"
               for src in [t for t in args.split() if not t.startswith("--")][:-1]]
    assert sources
    for source in sources:
        files = [ROOT / source] if (ROOT / source).is_file() else \
            [p for p in (ROOT / source).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files, source
        for file in files:
            assert not _excluded(file.relative_to(ROOT).as_posix()), file
