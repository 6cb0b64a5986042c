"""The runner on a real autoscaling Ray cluster: Ray's own autoscaler (v1, the cluster launcher's)
with its fake multi-node provider, which starts real Ray nodes on this machine instead of cloud
instances. The worker node type carries a custom resource, `fake_gpu`, that the training stage asks
for, since there is no CUDA here: it stands for a GPU node type that scales from zero.

- A two-worker pretrain stage brings two worker nodes up from zero, says so while they come up,
  and they go away after the stage.
- One of them is lost mid-training (every process SIGKILLed, as when a spot node is reclaimed): the
  autoscaler starts a replacement for the restarted worker group, which resumes from the last
  commit and finishes.
- A stage no node type can hold fails at once, listing the node types.

The fake provider is named by module path (`type: external`): Ray 2.60's wheel lacks the defaults
file that `type: fake_multinode` needs. The driver is the CLI in a subprocess, as a user runs it
against a cluster (`orchestrator run --address`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

from jobs.checkpoint import committed_steps
from jobs.storage import open_storage
from orchestrator.records import load_record
from ray_nodes import (BIN, FAST_NODE_DEATH, LOOPBACK_ONLY, NODE_ENV, Node, alive_nodes, cmdline, free_port, kill,
                       ray_start, user_env, wait_for)

pytestmark = pytest.mark.local

DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "examples", "data", "*.jsonl"))
NODE_TYPE = {"CPU": 1, "fake_gpu": 1}
# Enough for preprocessing's tasks at once: a backlog of CPU tasks would make the autoscaler add
# fake_gpu nodes for their CPU before the training stage asks for them.
HEAD_CPUS = 4
# 40 steps train in ~4 s here once the workers are up: 80 leave a window of several seconds to
# lose a node in after the first commit.
STEPS, EVERY = 80, 5
START_TIMEOUT_S = 90
RUN_TIMEOUT_S = 300


def autoscaling_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "fake", "max_workers": 3, "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,  # 6 s
        "provider": {"type": "external",
                     "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
                     "gcs_address": gcs_address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "head_node_type": FAKE_HEAD_NODE_TYPE,  # the fake provider's name for the head
        "available_node_types": {
            FAKE_HEAD_NODE_TYPE: {"resources": {"CPU": HEAD_CPUS}, "node_config": {}, "max_workers": 0},
            # three: the two a stage needs and a replacement while the lost one is still listed
            "fake_gpu_node": {"resources": {**NODE_TYPE, "object_store_memory": 200 * 2**20}, "node_config": {},
                              "min_workers": 0, "max_workers": 3},
        },
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class AutoscalingCluster:
    """A head with 4 CPUs (the tokenizer and preprocessing run there) and Ray's autoscaler, which
    adds `fake_gpu_node`s on demand: processes of the head's session, like everything it starts."""

    def __init__(self, root: str):
        self.root = root
        self.env = {**user_env(root), **LOOPBACK_ONLY}
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        config = os.path.join(root, "autoscaling.json")
        with open(config, "w") as f:
            json.dump(autoscaling_config(self.address), f)
        head_env = {**self.env, **NODE_ENV, **FAST_NODE_DEATH, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        self.head = Node("head", ray_start(root, "head", [
            "--head", f"--port={port}", f"--num-cpus={HEAD_CPUS}", "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}", f"--autoscaling-config={config}"]), head_env,
            os.path.join(root, "head.log"))

    def fake_gpu_nodes(self) -> int:
        """How many worker nodes the GCS counts alive (-1 if it could not be asked)."""
        nodes = alive_nodes(self.address, self.env)
        return -1 if nodes is None else sum(1 for n in nodes if n.get("fake_gpu"))

    def lose_a_training_node(self) -> str:
        """SIGKILL a worker node that runs a training worker: its raylet, everything the raylet
        started and its agents (the autoscaler's nodes are processes of the head's session; each
        raylet and agent carries its node id on its command line)."""
        raylets = [p for p in self.head.processes() if "raylet/raylet" in cmdline(p)]
        for raylet in raylets:
            node_id = next(a.split("=", 1)[1] for a in raylet.cmdline() if a.startswith("--node_id="))
            children = raylet.children(recursive=True)
            if not any("ray::RayTrainWorker" in cmdline(c) for c in children):
                continue
            agents = [p for p in self.head.processes() if node_id in cmdline(p)]
            kill([raylet, *children, *agents])
            return node_id
        raise AssertionError("no worker node runs a training worker")

    def stop(self) -> None:
        self.head.stop()  # the autoscaler's nodes are in its session

    def logs(self) -> str:
        monitor = os.path.join(self.root, "head", "session_latest", "logs", "monitor.log")
        tail = open(monitor).read()[-3000:] if os.path.exists(monitor) else ""
        return f"{self.head.tail()}\n--- autoscaler ---\n{tail}"


@pytest.fixture(scope="module")
def cluster():
    root = tempfile.mkdtemp(prefix="as-", dir="/tmp")
    c = AutoscalingCluster(root)
    try:
        wait_for(lambda: c.fake_gpu_nodes() == 0, "the head", START_TIMEOUT_S, poll_s=0.5)
        yield c
    except AssertionError as e:
        raise AssertionError(f"{e}\n{c.logs()}") from None
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def pipeline(storage: str, **pretrain) -> dict:
    source = {"paths": [DATA]}
    return {"name": "autoscale", "storage": storage, "stages": {
        "tok": {"kind": "tokenizer", "source": source, "vocab_size": 1024, "sample_mb": 0.5},
        "corpus": {"kind": "preprocess", "source": source, "tokenizer": "tok", "seq_len": 64, "shard_mb": 1},
        "pretrain": {"kind": "pretrain", "data": "corpus", "steps": STEPS, "checkpoint_every": EVERY,
                     "log_every": EVERY, "micro_batch": 4, "lr": 0.003, "warmup_steps": 2, "zero_stage": 2,
                     "num_workers": 2, "cpus_per_worker": 1, "resources_per_worker": {"fake_gpu": 1},
                     "max_failures": 3, "model": {"preset": "tiny", "max_position_embeddings": 64}, **pretrain},
    }}


def start_driver(cluster: AutoscalingCluster, tmp_path, spec: dict, run_id: str) -> tuple[subprocess.Popen, str]:
    spec_path = tmp_path / f"{run_id}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = str(tmp_path / f"{run_id}.log")
    with open(log_path, "w") as log:
        driver = subprocess.Popen([os.path.join(BIN, "orchestrator"), "run", str(spec_path), "--run-id", run_id,
                                   "--address", cluster.address], env=cluster.env, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    return driver, log_path


def test_a_stage_no_node_type_can_hold_fails_at_once_listing_the_node_types(cluster, tmp_path):
    spec = pipeline(f"file://{tmp_path}/store", num_workers=1, resources_per_worker={"fake_gpu": 2})
    started = time.monotonic()
    driver, log_path = start_driver(cluster, tmp_path, spec, "too-big")
    driver.wait(120)
    output = open(log_path).read()
    assert driver.returncode == 2, output
    assert time.monotonic() - started < 60, "refused before anything ran"
    assert "stages.pretrain: one worker needs {CPU: 1, fake_gpu: 2}" in output
    assert "node types: fake_gpu_node {CPU: 1, fake_gpu: 1}" in output
    assert cluster.fake_gpu_nodes() == 0  # nothing was asked of the autoscaler


def test_training_nodes_come_up_from_zero_survive_a_lost_node_and_go_away(cluster, tmp_path):
    store = f"file://{tmp_path}/store"  # every node is on this machine: a shared disk
    storage = open_storage(store)
    run_id = "autoscale-1"
    assert cluster.fake_gpu_nodes() == 0
    driver, log_path = start_driver(cluster, tmp_path, pipeline(store), run_id)
    most_nodes = 0

    def output() -> str:
        return open(log_path).read()

    def driver_running():
        assert driver.poll() is None, f"the driver exited with {driver.returncode}:\n{output()[-5000:]}"

    def first_commit() -> int | None:
        nonlocal most_nodes
        most_nodes = max(most_nodes, cluster.fake_gpu_nodes())
        record = load_record(storage, run_id)
        stage = record.stages.get("pretrain") if record else None
        if stage is None or stage.status != "running":
            return None
        steps, _ = committed_steps(open_storage(stage.output_uri).sub("ckpt"))
        return steps[0] if steps else None

    try:
        committed = wait_for(first_commit, "a committed pretrain checkpoint", RUN_TIMEOUT_S, poll_s=0.5,
                             check=driver_running)
        assert most_nodes == 2, f"the stage's two workers brought up {most_nodes} nodes"
        lost = cluster.lose_a_training_node()
        lost_at = time.monotonic()
        print(f"lost node {lost[-5:]} after step {committed} was committed")
        driver.wait(RUN_TIMEOUT_S)
        print(f"the driver exited {driver.returncode} {time.monotonic() - lost_at:.1f}s after the loss")
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()

    record = load_record(storage, run_id)
    assert driver.returncode == 0 and record.status == "succeeded", output()[-5000:]
    text = output()
    assert "waiting for nodes: the stage needs {CPU: 2, fake_gpu: 2}, the cluster has {CPU: 4}" in text, text[-5000:]
    assert "Raylet is terminated" not in text  # Ray's message about the lost node went to the log file
    assert "nodes are up" in text
    stage = record.stages["pretrain"]
    # The worker group was restarted on a replacement node, from the commit seen before the loss
    # or a later one (training went on between that look at storage and the kill).
    assert stage.attempts >= 2 and stage.metrics["restarts"] >= 1, text[-5000:]
    assert stage.metrics["resumed_from"] is not None and stage.metrics["resumed_from"] >= committed
    assert f"resumed from step {stage.metrics['resumed_from']}" in text
    steps, _ = committed_steps(open_storage(stage.output_uri).sub("ckpt"))
    assert steps[0] == STEPS and stage.metrics["last_checkpoint"].endswith(f"step-{STEPS:08d}")
    history = stage.metrics["loss_history"]
    assert [step for step, _ in history][-1] == STEPS and all(math.isfinite(loss) for _, loss in history)
    # The stage released its request: idle nodes go (6 s idle timeout; a lost one is already gone).
    ended = time.monotonic()
    wait_for(lambda: cluster.fake_gpu_nodes() == 0, "the worker nodes to scale back to zero", 90, poll_s=1)
    print(f"scaled back to zero {time.monotonic() - ended:.1f}s after the run")
