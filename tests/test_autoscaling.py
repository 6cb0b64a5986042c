"""The runner on an autoscaling cluster, without one: what it asks the autoscaler for and when,
what it says while nodes come up, and what it refuses before anything starts.

Ray is replaced at its two seams (`ray_runtime.connect`, `ray_runtime.capacity`) and the stages
by a stand-in that returns at once; the requests are recorded where `request_resources` would
send them. Ray's real autoscaler drives the same runner in test_autoscaling_local.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import threading

import pytest

from jobs.storage import open_storage
from orchestrator import ray_runtime, runner
from orchestrator.console import Console
from orchestrator.errors import UserError
from orchestrator.kinds import KINDS
from orchestrator.kinds.base import StageResults
from orchestrator.ray_runtime import ClusterView
from orchestrator.resources import ceiling
from orchestrator.spec import parse_spec
from orchestrator.stages import StageOutput

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_TYPE = {"CPU": 8.0, "GPU": 4.0}


def pipeline(tmp_path, **pretrain) -> str:
    source = {"paths": [os.path.join(REPO, "examples", "data", "*.jsonl")]}
    return json.dumps({"name": "scale", "storage": f"file://{tmp_path}/store", "stages": {
        "tok": {"kind": "tokenizer", "source": source},
        "corpus": {"kind": "preprocess", "source": source, "tokenizer": "tok"},
        "pre": {"kind": "pretrain", "data": "corpus", "num_workers": 2, "use_gpu": True, **pretrain},
    }})


@pytest.fixture
def cluster(monkeypatch):
    """A head with 2 CPUs and no GPU, and one GPU node type the autoscaler may add twice. A GPU
    node "comes up" at the second look after the autoscaler was asked for GPUs."""
    state = {"requests": [], "looks_since_asked": None}
    base = ClusterView({"CPU": 2.0}, [{"CPU": 2.0}], {"gpu": GPU_TYPE}, {"CPU": 18.0, "GPU": 8.0})

    def capacity(autoscaler=True):
        if state["looks_since_asked"] is not None:
            state["looks_since_asked"] += 1
        if (state["looks_since_asked"] or 0) >= 2:
            return ClusterView({"CPU": 10.0, "GPU": 4.0}, [{"CPU": 2.0}, GPU_TYPE], base.node_types, base.most)
        return base

    def request(bundles):
        state["requests"].append(bundles)
        if any("GPU" in b for b in bundles) and state["looks_since_asked"] is None:
            state["looks_since_asked"] = 0

    monkeypatch.setattr(ray_runtime, "connect", lambda address=None: None)
    monkeypatch.setattr(ray_runtime, "capacity", capacity)
    monkeypatch.setattr(ray_runtime, "request_resources", request)
    monkeypatch.setattr(runner, "_NODE_POLL_S", 0.05)
    return state


def stage(ctx):
    """Every kind's stand-in: the runner's scheduling is under test, not the stages."""
    if ctx.name == "pre":  # long enough for the watcher to see the nodes arrive
        threading.Event().wait(0.3)
    return StageOutput({}, {})


FAKE_KINDS = {name: dataclasses.replace(kind, run=stage, results=StageResults) for name, kind in KINDS.items()}


def run(spec_text: str):
    spec = parse_spec(spec_text)
    out = io.StringIO()
    record = runner.run_pipeline(spec, open_storage(spec.storage), console=Console(out), kinds=FAKE_KINDS)
    return record, out.getvalue()


def test_the_runner_asks_for_each_stages_bundles_and_releases_them_when_it_ends(cluster, tmp_path):
    record, out = run(pipeline(tmp_path))
    assert record.status == "succeeded"
    gpu_worker = {"CPU": 1.0, "GPU": 1.0}
    # One stage at a time here (each reads the previous one): ask, release, ask, release, ...
    assert cluster["requests"] == [[{"CPU": 1.0}], [], [{"CPU": 1.0}], [], [gpu_worker, gpu_worker], []]
    assert "pre: waiting for nodes: the stage needs {CPU: 2, GPU: 2}, the cluster has {CPU: 2}" in out
    assert "pre: nodes are up: the cluster has {CPU: 10, GPU: 4}" in out


def test_a_stage_no_node_type_can_hold_fails_before_anything_starts_and_lists_the_node_types(cluster, tmp_path):
    with pytest.raises(UserError) as error:
        run(pipeline(tmp_path, cpus_per_worker=16, num_workers=1))
    assert str(error.value) == ("stages.pre: one worker needs {CPU: 16, GPU: 1}, but no node is that large "
                                "(nodes: {CPU: 2}; node types: gpu {CPU: 8, GPU: 4}); lower cpus_per_worker or "
                                "add larger nodes")
    assert cluster["requests"] == []  # nothing was asked of the autoscaler, nothing ran


def test_more_gpus_than_the_autoscaler_may_ever_add_fail_before_anything_starts(cluster, tmp_path):
    with pytest.raises(UserError, match=r"stages.pre: needs 10 GPU in all \(10 x \{CPU: 1, GPU: 1\}\), but the "
                                         r"cluster has 8 GPU; lower num_workers or add nodes"):
        run(pipeline(tmp_path, num_workers=10))


def test_ceiling_is_what_the_autoscaler_may_reach_or_the_cluster_now():
    assert ceiling({"CPU": 0.0}, {"CPU": 96.0, "GPU": 8.0}) == {"CPU": 96.0, "GPU": 8.0}
    assert ceiling({"CPU": 4.0, "GPU": 1.0}, None) == {"CPU": 4.0, "GPU": 1.0}
    assert ceiling({"CPU": 4.0, "custom": 1.0}, {"CPU": 2.0}) == {"CPU": 4.0, "custom": 1.0}
