"""A small pipeline (tokenizer, preprocess, a few steps of pretraining on Ray Train + DeepSpeed,
evaluation) tracked to a real MLflow server (sqlite backend, local artifact root, on 127.0.0.1)
and to W&B in offline mode, read back with MlflowClient and from W&B's own run file.

The run fails once on purpose (a worker dies at step 3, with no restarts allowed) and is resumed
under the same run id, so one run shows both what tracking records and that a resumed run
continues its MLflow and W&B runs. The last test stops the server in the middle of another run
(a tokenizer stage alone: what matters is that the run goes on, not which call found the server
gone): it must stay last in this module, since the server is the module's.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from jobs.storage import open_storage
from orchestrator.console import Console
from orchestrator.ray_runtime import WORKER_ENV
from orchestrator.records import load_record
from orchestrator.runner import run_pipeline
from orchestrator.spec import parse_spec
from orchestrator.tracking import TrackingError
from wandb_records import read_offline_run

pytestmark = pytest.mark.local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_ID = "tracked"


def pipeline(storage: str, tracking: dict, **pretrain) -> str:
    source = {"paths": [os.path.join(REPO, "examples", "data", "*.jsonl")]}
    stages = {
        "tok": {"kind": "tokenizer", "source": source, "vocab_size": 1024, "sample_mb": 0.5},
        "corpus": {"kind": "preprocess", "source": source, "tokenizer": "tok", "seq_len": 64, "shard_mb": 1,
                   "validation_fraction": 0.05},
        "pretrain": {"kind": "pretrain", "data": "corpus", "steps": 6, "checkpoint_every": 2, "log_every": 2,
                     "micro_batch": 4, "lr": 0.003, "warmup_steps": 1, "max_failures": 0, "num_workers": 1,
                     "model": {"preset": "tiny", "max_position_embeddings": 64}, **pretrain},
        "eval": {"kind": "evaluate", "models": ["pretrain"], "data": "corpus", "max_val_sequences": 8},
    }
    return json.dumps({"name": "tracking-test", "storage": storage, "stages": stages, "tracking": tracking})


def run(spec_text: str, run_id: str, console: Console | None = None):
    spec = parse_spec(spec_text)
    return run_pipeline(spec, open_storage(spec.storage), run_id=run_id,
                        console=console or Console(open(os.devnull, "w")))


class MlflowServer:
    """`mlflow server` in its own process group, on a free port of 127.0.0.1."""

    def __init__(self, root):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{port}"
        self.log = open(root / "server.log", "wb")
        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        self.process = subprocess.Popen(
            [mlflow, "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination",
             str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_healthy(self, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}); see {self.log.name}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"mlflow server not healthy after {timeout_s}s; see {self.log.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own group: the server and its workers
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """Started, not yet healthy: it starts while Ray does (`wait_healthy` before use)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory):
    """The pipeline's first attempt (fails at step 3, after the checkpoint of step 2) and its
    resumption, with what MLflow held after the first attempt. Ray stays up for the module's
    other run (its workers no longer crash: the crash happened once)."""
    import ray
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("tracked")
    storage = f"file://{root}/store"
    tracking = {"mlflow": {"tracking_uri": mlflow_server.uri}, "wandb": {"project": "tracking-test", "mode": "offline"}}
    spec = pipeline(storage, tracking)
    with pytest.MonkeyPatch.context() as env:
        # A lost server fails fast (the default retries take minutes); set here, so restored after.
        env.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        env.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
        env.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        env.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        env.setenv("WANDB_DIR", str(root))
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.delenv("WANDB_API_KEY", raising=False)
        env.setenv("ORCHESTRATOR_CRASH_AT", "train:3")  # Ray's workers take the environment of ray.init
        env.setenv("ORCHESTRATOR_CRASH_ONCE_DIR", str(root / "once"))
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": WORKER_ENV})
        try:
            mlflow_server.wait_healthy()
            with pytest.raises(Exception):
                run(spec, RUN_ID)
            first = load_record(open_storage(storage), RUN_ID)
            client = MlflowClient(mlflow_server.uri)
            [parent] = runs_of(client, RUN_ID, nested=False)
            [pretrain] = [r for r in runs_of(client, RUN_ID, nested=True) if r.data.tags["orchestrator.stage"] == "pretrain"]
            first_losses = client.get_metric_history(pretrain.info.run_id, "loss")
            record = run(spec, RUN_ID)
            yield {"record": record, "first": first, "parent": parent, "pretrain": pretrain,
                   "first_losses": first_losses, "storage": open_storage(storage), "root": root, "spec": spec}
        finally:
            ray.shutdown()


def runs_of(client, run_id: str, nested: bool) -> list:
    experiment = client.get_experiment_by_name("tracking-test")
    found = client.search_runs([experiment.experiment_id], f"tags.`orchestrator.run_id` = '{run_id}'")
    return [r for r in found if ("mlflow.parentRunId" in r.data.tags) == nested]


def test_mlflow_holds_the_run_its_stage_runs_params_metrics_and_report(tracked, mlflow_server, tmp_path):
    from mlflow import MlflowClient

    client, record = MlflowClient(mlflow_server.uri), tracked["record"]
    assert tracked["first"].status == "failed" and record.status == "succeeded"
    [parent] = runs_of(client, RUN_ID, nested=False)
    assert parent.info.status == "FINISHED"
    assert {k: parent.data.tags[f"orchestrator.{k}"] for k in ("run_id", "pipeline", "spec_hash")} == {
        "run_id": RUN_ID, "pipeline": "tracking-test", "spec_hash": record.spec_hash}

    stage_runs = {r.data.tags["orchestrator.stage"]: r for r in runs_of(client, RUN_ID, nested=True)}
    assert set(stage_runs) == set(record.stages)  # one nested run per stage, over both attempts
    for name, stage in record.stages.items():
        run = stage_runs[name]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.info.status == "FINISHED", name
        assert (run.data.tags["orchestrator.kind"], run.data.tags["orchestrator.hash"],
                run.data.tags["orchestrator.output_uri"]) == (stage.kind, stage.hash, stage.output_uri)

    # Params: the stage's output fields, flattened; nothing operational.
    params = stage_runs["pretrain"].data.params
    assert params["steps"] == "6" and params["lr"] == "0.003" and params["model.preset"] == "tiny"
    assert params["data"] == "corpus" and "max_failures" not in params and "log_every" not in params
    assert stage_runs["corpus"].data.params["source.paths"] == json.dumps(
        [os.path.join(REPO, "examples", "data", "*.jsonl")])

    # Step metrics by step, over both attempts; the steps after the resume are the record's curve.
    pretrain_id = stage_runs["pretrain"].info.run_id
    losses = {m.step: m.value for m in client.get_metric_history(pretrain_id, "loss")}
    assert sorted(losses) == [2, 4, 6]
    assert {step: losses[step] for step in (4, 6)} == pytest.approx(dict(record.stages["pretrain"].metrics["loss_history"]))
    for metric in ("lr", "grad_norm", "tokens_per_s", "tflops_per_device"):
        assert [m.step for m in client.get_metric_history(pretrain_id, metric)] == [2, 4, 6], metric
    assert "mfu" not in stage_runs["pretrain"].data.metrics  # no stated peak on a CPU: no MFU

    # Each stage's final results, on its run and (prefixed) on the pipeline's.
    corpus = record.stages["corpus"].metrics
    assert stage_runs["corpus"].data.metrics["num_documents"] == corpus["num_documents"]
    assert stage_runs["corpus"].data.metrics["num_tokens"] == corpus["num_tokens"]
    perplexity = record.stages["eval"].metrics["results"]["pretrain"]["perplexity"]["perplexity"]
    assert stage_runs["eval"].data.metrics["results.pretrain.perplexity.perplexity"] == pytest.approx(perplexity)
    assert parent.data.metrics["eval.results.pretrain.perplexity.perplexity"] == pytest.approx(perplexity)
    assert parent.data.metrics["pretrain.final_loss"] == pytest.approx(record.stages["pretrain"].metrics["final_loss"])

    # Artifacts: the run's report and its loss plot, as storage has them.
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"report.md", "loss-pretrain.png"} <= names
    local = client.download_artifacts(parent.info.run_id, "report.md", str(tmp_path))
    with open(local, "rb") as f:
        assert f.read() == tracked["storage"].read_bytes(f"runs/{RUN_ID}/report.md")


def test_a_resumed_run_continues_its_mlflow_run(tracked, mlflow_server):
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    first_parent, first_pretrain = tracked["parent"], tracked["pretrain"]
    # After the first attempt: its run failed there, with the loss of the one step logged before the crash.
    assert first_parent.info.status == "FAILED" and first_pretrain.info.status == "FAILED"
    assert [m.step for m in tracked["first_losses"]] == [2]
    [parent] = runs_of(client, RUN_ID, nested=False)
    [pretrain] = [r for r in runs_of(client, RUN_ID, nested=True) if r.data.tags["orchestrator.stage"] == "pretrain"]
    assert parent.info.run_id == first_parent.info.run_id and pretrain.info.run_id == first_pretrain.info.run_id
    assert parent.data.tags["orchestrator.attempts"] == "2"
    appended = client.get_metric_history(pretrain.info.run_id, "loss")
    assert [(m.step, m.value) for m in appended[:1]] == [(m.step, m.value) for m in tracked["first_losses"]]
    assert [m.step for m in appended] == [2, 4, 6]
    # The stages the first attempt committed were not logged twice.
    [corpus] = [r for r in runs_of(client, RUN_ID, nested=True) if r.data.tags["orchestrator.stage"] == "corpus"]
    assert len(client.get_metric_history(corpus.info.run_id, "num_documents")) == 1


def test_wandb_offline_writes_the_run_with_its_metrics_results_and_report(tracked):
    record = tracked["record"]
    paths = sorted(glob.glob(str(tracked["root"] / "wandb" / f"offline-run-*-{RUN_ID}" / f"run-{RUN_ID}.wandb")))
    assert len(paths) == 2  # one per attempt, under the same W&B run id: `wandb sync` joins them
    first, second = (read_offline_run(p) for p in paths)
    assert first.run_id == second.run_id == RUN_ID and second.tags == ["tracking-test"]
    assert second.config["orchestrator"] == {"run_id": RUN_ID, "pipeline": "tracking-test",
                                             "spec_hash": record.spec_hash, "storage": record.storage}
    losses = {row["pretrain/step"]: row["pretrain/loss"] for run in (first, second) for row in run.history
              if "pretrain/loss" in row}
    assert sorted(losses) == [2, 4, 6]
    assert {step: losses[step] for step in (4, 6)} == pytest.approx(dict(record.stages["pretrain"].metrics["loss_history"]))
    pretrain = second.config["stages"]["pretrain"]
    assert pretrain["hash"] == record.stages["pretrain"].hash and pretrain["params"]["steps"] == "6"
    perplexity = record.stages["eval"].metrics["results"]["pretrain"]["perplexity"]["perplexity"]
    assert second.summary["eval/results.pretrain.perplexity.perplexity"] == pytest.approx(perplexity)
    assert second.summary["corpus/num_documents"] == record.stages["corpus"].metrics["num_documents"]
    assert (first.exit_code, second.exit_code) == (1, 0)
    # The report and its plot, among the run's files.
    files = os.path.join(os.path.dirname(paths[1]), "files")
    assert {"report.md", "loss-pretrain.png"} <= set(second.files)
    with open(os.path.join(files, "report.md"), "rb") as f:
        assert f.read() == tracked["storage"].read_bytes(f"runs/{RUN_ID}/report.md")


def test_an_unreachable_server_warns_once_or_fails_the_run_when_required(tracked):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{s.getsockname()[1]}"
    spec = json.loads(tracked["spec"])
    spec["tracking"] = {"mlflow": {"tracking_uri": nowhere}}
    out = io.StringIO()
    record = run(json.dumps(spec), "unreachable", Console(out))  # every stage cached: no Ray needed
    assert record.status == "succeeded" and all(s.cached for s in record.stages.values())
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning: tracking")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: tracking to mlflow ({nowhere}) failed:")

    spec["tracking"]["required"] = True
    with pytest.raises(TrackingError, match=rf"tracking.mlflow \({nowhere}\) failed: .*tracking.required is true"):
        run(json.dumps(spec), "required")
    failed = load_record(tracked["storage"], "required")
    assert failed.status == "failed" and not any(s.status == "running" for s in failed.stages.values())


def test_the_server_stopped_mid_run_the_run_succeeds_with_one_warning(tracked, mlflow_server, caplog):
    """Stops the module's server: keep it the module's last test."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    tracked_stage = threading.Event()

    def stop_once_the_stage_is_tracked():
        deadline = time.time() + 120
        while time.time() < deadline and not runs_of(client, "stopped", nested=True):
            time.sleep(0.1)
        tracked_stage.set()
        mlflow_server.stop()

    # A tokenizer with another vocabulary: one stage that runs, tracked to MLflow alone. The
    # server goes away while it runs (or, should the stage be quicker, before the run ends).
    spec = json.loads(tracked["spec"])
    spec["stages"] = {"tok": {**spec["stages"]["tok"], "vocab_size": 1000}}
    spec["tracking"] = {"mlflow": {"tracking_uri": mlflow_server.uri}}
    stopper = threading.Thread(target=stop_once_the_stage_is_tracked, daemon=True)
    out = io.StringIO()
    stopper.start()
    with caplog.at_level(logging.WARNING, logger="orchestrator.tracking"):
        record = run(json.dumps(spec), "stopped", Console(out))
    stopper.join(timeout=60)
    assert tracked_stage.is_set() and mlflow_server.process.poll() is not None
    assert record.status == "succeeded" and record.stages["tok"].status == "succeeded" and not record.stages["tok"].cached
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning: tracking")]
    assert len(warnings) == 1, out.getvalue()
    assert warnings[0].startswith(f"warning: tracking to mlflow ({mlflow_server.uri}) failed:")
    assert [r.levelno for r in caplog.records if r.name == "orchestrator.tracking"] == [logging.WARNING]
    assert open_storage(record.storage).exists("runs/stopped/report.md")
