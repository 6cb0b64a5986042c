"""Submission through the Ray Jobs API, against a real Ray head started here with token
authentication on: submit, follow, list, inspect, stop, each checked against Ray's own view of the
job (the Jobs SDK, and `ray job status`) and against the run record in storage.

The CLI runs as a subprocess, as a user runs it: Ray reads its authentication settings once per
process, so the environment each call gets is the one it sees.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import psutil
import pytest

from corpus import make_corpus
from drivers import interruptible
from jobs.storage import open_storage
from orchestrator.cli import main as cli_main
from orchestrator.records import RunRecord, StageRecord, load_record, save_record
from orchestrator.submit import mark_stopped
from ray_nodes import cmdline, free_port, wait_for

pytestmark = pytest.mark.local

BIN = os.path.dirname(sys.executable)
START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300


@dataclass
class RayHead:
    address: str
    token: str
    env: dict[str, str]
    """The environment of a user of this cluster: its token, no other Ray address."""
    driver_log_dir: str
    gcs: str
    """The GCS address, for a driver that connects itself (`orchestrator run --address`)."""
    pid: int
    """Our `ray start --block`: every process of the head descends from it."""

    def client(self):
        from ray.job_submission import JobSubmissionClient

        # The header, not the environment: this process's Ray has already read its auth settings.
        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def cli(self, *args: str, cwd: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(BIN, "orchestrator"), *args], cwd=cwd, env=env or self.env,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


@contextlib.contextmanager
def ray_head(env_overrides: dict[str, str] | None = None):
    """A Ray head on 127.0.0.1 with its dashboard (the Jobs API) and token authentication on, in a
    temp dir of its own. Stopped by signalling our `ray start --block` process, which stops what
    it started; then any process of its tree still there is killed by pid. (`ray stop` would stop
    every Ray on the machine, other test sessions' included.)"""
    # Short: Ray's socket paths under the temp dir must fit in 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(env_overrides or {})
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}:{env.get('PATH', '')}",
               ORCHESTRATOR_LOG_DIR=os.path.join(temp_dir, "driver-logs"))
    dashboard, gcs_port = free_port(), free_port()
    cmd = [os.path.join(BIN, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
           f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
           "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp_dir}/ray", "--disable-usage-stats"]
    log = open(os.path.join(temp_dir, "head.log"), "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = RayHead(f"http://127.0.0.1:{dashboard}", token, env, env["ORCHESTRATOR_LOG_DIR"], f"127.0.0.1:{gcs_port}",
                   proc.pid)
    try:
        _wait_until_up(head, proc, os.path.join(temp_dir, "head.log"))
        yield head
    finally:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.terminate()
        try:
            proc.wait(5)  # what a graceful stop takes beyond this (~30 s) is Ray's, and not tested here
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_until_up(head: RayHead, proc: subprocess.Popen, log_path: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{open(log_path).read()[-3000:]}")
        if http_status(f"{head.address}/api/jobs/", head.token) == 200:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not come up in {START_TIMEOUT_S}s:\n{open(log_path).read()[-3000:]}")


def http_status(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0  # not listening yet


def tiny_pipeline(name: str, storage: str, **extra_stages) -> dict:
    """Tokenizer + preprocess over `data/*.jsonl`, a path relative to the submitting directory."""
    return {"name": name, "storage": storage, "stages": {
        "tok": {"kind": "tokenizer", "source": {"paths": ["data/*.jsonl"]}, "vocab_size": 512},
        "corpus": {"kind": "preprocess", "source": {"paths": ["data/*.jsonl"]}, "tokenizer": "tok", "seq_len": 64,
                   "validation_fraction": 0.1},
        **extra_stages,
    }}


def make_workdir(path) -> str:
    """A directory to submit from: a small corpus under data/."""
    os.makedirs(path / "data")
    make_corpus(str(path / "data"), num_files=2, docs_per_file=100)
    return str(path)


def write_spec(workdir: str, name: str, spec: dict) -> str:
    with open(os.path.join(workdir, name), "w") as f:
        json.dump(spec, f)
    return name


@pytest.fixture(scope="module")
def head():
    with ray_head() as h:
        yield h


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_workdir(tmp_path_factory.mktemp("submit"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return "file://" + str(tmp_path_factory.mktemp("store"))


def test_the_cluster_refuses_a_client_without_the_token(head, tmp_path):
    assert http_status(f"{head.address}/api/jobs/", None) == 401
    assert http_status(f"{head.address}/api/jobs/", "not-the-token") == 403
    assert http_status(f"{head.address}/api/jobs/", head.token) == 200

    # Our CLI without a token (and no token file: another HOME) is refused, clearly, exit 2.
    bare = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    result = head.cli("runs", "--address", head.address, env={**bare, "HOME": str(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert "refused" in result.stderr and "Missing authentication token" in result.stderr

    # A token configured without RAY_AUTH_MODE is used all the same (Ray's own client would not
    # send it); an explicit --address wins over a stale RAY_ADDRESS.
    result = head.cli("runs", "--address", head.address,
                      env={**bare, "HOME": str(tmp_path), "RAY_AUTH_TOKEN": head.token, "RAY_ADDRESS": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    assert head.token not in result.stdout + result.stderr


def test_submit_follow_list_and_a_duplicate_submit(head, workdir, store):
    spec = write_spec(workdir, "tiny.yaml", tiny_pipeline("tiny", store))
    run_id = "tiny-run-1"
    submitted = head.cli("submit", spec, "--address", head.address, "--run-id", run_id, cwd=workdir)
    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.strip() == run_id

    followed = head.cli("logs", run_id, "-f", "--address", head.address)
    assert followed.returncode == 0, followed.stderr
    # The driver's own output, from submission to its summary.
    assert f"orchestrator run tiny.yaml --run-id {run_id}" in followed.stdout
    assert "✓ tok" in followed.stdout and "✓ corpus" in followed.stdout
    assert f"run {run_id}: succeeded" in followed.stdout
    assert f"ray job {run_id}: SUCCEEDED" in followed.stderr

    client = head.client()
    jobs = [job for job in client.list_jobs() if job.submission_id == run_id]
    assert len(jobs) == 1 and jobs[0].status == "SUCCEEDED"
    assert jobs[0].runtime_env["working_dir"].startswith("gcs://")  # the pipeline and data/ travelled with it
    assert client.get_job_logs(run_id) == followed.stdout  # `logs --address` is `ray job logs`

    record = load_record(open_storage(store), run_id)
    assert record.status == "succeeded"
    assert {name: s.status for name, s in record.stages.items()} == {"tok": "succeeded", "corpus": "succeeded"}
    assert record.stages["corpus"].metrics["num_documents"] > 0

    status = head.cli("status", run_id, "--address", head.address)
    assert status.returncode == 0, status.stderr
    assert f"ray job {run_id}: SUCCEEDED" in status.stdout and f"run {run_id} (tiny): succeeded" in status.stdout
    as_json = json.loads(head.cli("status", run_id, "--address", head.address, "--json").stdout)
    assert as_json["status"] == "succeeded" and as_json["ray_job"]["status"] == "SUCCEEDED"
    stock = subprocess.run([os.path.join(BIN, "ray"), "job", "status", run_id, "--address", head.address],
                           env=head.env, capture_output=True, text=True, timeout=60)
    assert f"Job '{run_id}' succeeded" in stock.stdout

    runs = head.cli("runs", "--address", head.address)
    (line,) = [line for line in runs.stdout.splitlines() if line.startswith(run_id)]
    assert line.split()[1:4] == ["tiny", "succeeded", "2/2"] and line.endswith("ray job: SUCCEEDED")

    # The same run id again: nothing new starts, and the existing job's status is reported.
    num_jobs = len(client.list_jobs())
    again = head.cli("submit", spec, "--address", head.address, "--run-id", run_id, cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == run_id
    assert "already" in again.stderr and "SUCCEEDED" in again.stderr
    assert len(client.list_jobs()) == num_jobs

    outputs = [submitted, followed, status, runs, again]
    assert not any(head.token in r.stdout + r.stderr for r in outputs)
    assert head.token not in json.dumps([job.model_dump(mode="json") for job in client.list_jobs()])


def test_schedule_submits_each_tick_once_even_after_dying_between_claim_and_submit(head, workdir, store):
    spec = write_spec(workdir, "sched.yaml", {**tiny_pipeline("sched", store), "schedule": {"cron": "30 2 * * *"}})
    run_id = "sched-20261120T0230Z"
    fire = ("schedule", spec, "--once", "--now", "2026-11-20T02:35:00+00:00", "--address", head.address)
    # The first scheduler claims the tick and dies before submitting.
    died = head.cli(*fire, cwd=workdir, env={**head.env, "ORCHESTRATOR_CRASH_AT": "schedule-claimed:1"})
    assert died.returncode == 137, died.stdout + died.stderr
    assert f"run {run_id}" in died.stdout
    client = head.client()
    assert not [job for job in client.list_jobs() if job.submission_id == run_id]
    # Restarted (twice): the claimed tick's run is submitted once, under the tick's run id.
    restarted = head.cli(*fire, cwd=workdir)
    again = head.cli(*fire, cwd=workdir)
    assert restarted.returncode == 0 and again.returncode == 0, restarted.stderr + again.stderr
    assert f"started {run_id}" in restarted.stdout and "started" not in again.stdout
    assert len([job for job in client.list_jobs() if job.submission_id == run_id]) == 1
    followed = head.cli("logs", run_id, "-f", "--address", head.address)
    assert f"run {run_id}: succeeded" in followed.stdout, followed.stdout[-3000:]
    listing = head.cli("schedule", spec, "--list", "--now", "2026-11-20T03:00:00+00:00", "--address", head.address,
                       cwd=workdir)
    assert f"run   {run_id}  succeeded" in listing.stdout, listing.stdout + listing.stderr


def test_stop_a_running_pipeline(head, workdir, store):
    pretrain = {"kind": "pretrain", "data": "corpus", "model": {"preset": "tiny", "max_position_embeddings": 64},
                "steps": 500, "micro_batch": 2, "num_workers": 1, "checkpoint_every": 500, "warmup_steps": 2}
    spec = write_spec(workdir, "long.yaml", tiny_pipeline("long", store, pretrain=pretrain))
    run_id = "long-run-1"
    assert head.cli("submit", spec, "--address", head.address, "--run-id", run_id, cwd=workdir).returncode == 0
    storage = open_storage(store)

    def pretrain_running():
        record = load_record(storage, run_id)
        return record is not None and record.stages["pretrain"].status == "running"

    wait_for(pretrain_running, "the pretrain stage to start", RUN_TIMEOUT_S, poll_s=0.5)
    stopped = head.cli("stop", run_id, "--address", head.address)
    assert stopped.returncode == 0, stopped.stderr
    assert f"run {run_id}: Ray job STOPPED; record: stopped" in stopped.stdout

    client = head.client()
    assert client.get_job_status(run_id) == "STOPPED"
    record = load_record(storage, run_id)
    assert record.status == "stopped" and record.finished_at is not None
    assert record.stages["pretrain"].status == "stopped" and record.stages["pretrain"].finished_at is not None
    assert record.stages["corpus"].status == "succeeded"
    # The driver caught Ray's SIGTERM and recorded the stop itself (not `stop` after a SIGKILL).
    assert record.stages["pretrain"].error == "interrupted"
    assert any(line.startswith("stopped; the record says so") for line in client.get_job_logs(run_id).splitlines())

    # Stopping it again: nothing to do, and said so.
    again = head.cli("stop", run_id, "--address", head.address)
    assert again.returncode == 0 and "already ended" in again.stdout


def test_ctrl_c_stops_a_run_driving_a_cluster_and_its_work_there(head, workdir, store):
    """`orchestrator run --address`: the driver is here, its training workers on the cluster.
    Ctrl-C: exit 130 within seconds, the record stopped, and the cluster ends the driver's actors."""
    pretrain = {"kind": "pretrain", "data": "corpus", "model": {"preset": "tiny", "max_position_embeddings": 64},
                "steps": 500, "micro_batch": 2, "num_workers": 1, "checkpoint_every": 500, "warmup_steps": 2}
    raw = tiny_pipeline("ctrl-c", store, pretrain=pretrain)
    for name in ("tok", "corpus"):  # the cluster's tasks read them: this machine's absolute paths
        raw["stages"][name]["source"]["paths"] = [os.path.join(workdir, "data", "*.jsonl")]
    spec = write_spec(workdir, "ctrl-c.yaml", raw)
    driver = subprocess.Popen([os.path.join(BIN, "orchestrator"), "run", spec, "--address", head.gcs,
                               "--run-id", "ctrl-c-1", "--storage", store], cwd=workdir, env=head.env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=interruptible)
    storage = open_storage(store)

    def training_on_the_cluster():
        record = load_record(storage, "ctrl-c-1")
        workers = [p for p in psutil.Process(head.pid).children(recursive=True) if "RayTrainWorker" in cmdline(p)]
        return record is not None and record.stages["pretrain"].status == "running" and workers

    try:
        wait_for(training_on_the_cluster, "training workers on the cluster", RUN_TIMEOUT_S, poll_s=0.5,
                 check=lambda: driver.poll() is None or pytest.fail(driver.stdout.read()))
        time.sleep(2)  # into the training loop
        driver.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        assert driver.wait(15) == 130, driver.stdout.read()
    finally:
        if driver.poll() is None:
            driver.kill()
    record = load_record(storage, "ctrl-c-1")
    assert record.status == "stopped" and record.stages["pretrain"].status == "stopped"
    wait_for(lambda: not any("RayTrainWorker" in cmdline(p) or "TrainController" in cmdline(p)
                             for p in psutil.Process(head.pid).children(recursive=True)),
             "the cluster to end the driver's training actors", max(1.0, 15 - (time.monotonic() - t0)))


def test_stop_records_a_driver_that_ray_had_to_kill(tmp_path):
    """A driver killed before it could write (SIGKILL) leaves `running`: `stop` says stopped."""
    storage = open_storage(str(tmp_path))
    stage = StageRecord(kind="pretrain", status="running", hash="h", output_uri="u")
    done = StageRecord(kind="tokenizer", status="succeeded", hash="h", output_uri="u")
    save_record(storage, RunRecord(run_id="r", pipeline="p", spec_hash="s", storage=storage.uri, status="running",
                                   stages={"tok": done, "pretrain": stage}))
    record = mark_stopped(storage, "r")
    assert record.status == "stopped" and record.finished_at is not None
    assert (record.stages["pretrain"].status, record.stages["tok"].status) == ("stopped", "succeeded")
    assert load_record(storage, "r") == record
    save_record(storage, record.model_copy(update={"status": "succeeded"}))
    assert mark_stopped(storage, "r").status == "succeeded"  # a finished run is left as it is


# --- what is refused before any cluster is contacted -----------------------------------------

@pytest.fixture
def nowhere() -> str:
    """An address where nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


def test_a_bad_spec_exits_2_without_contacting_the_cluster(tmp_path, monkeypatch, capsys, nowhere):
    monkeypatch.chdir(make_workdir(tmp_path))
    spec = tiny_pipeline("bad", "file:///tmp/x")
    spec["stages"]["corpus"]["seq_len"] = "long"
    write_spec(".", "bad.yaml", spec)
    assert cli_main(["submit", "bad.yaml", "--address", nowhere]) == 2
    err = capsys.readouterr().err
    assert "stages.corpus.seq_len" in err and "cannot reach" not in err


def test_paths_that_cannot_reach_the_cluster_exit_2(tmp_path, monkeypatch, capsys, nowhere):
    monkeypatch.chdir(make_workdir(tmp_path))
    spec = tiny_pipeline("paths", "file:///tmp/x")
    spec["stages"]["tok"]["source"]["paths"] = ["../elsewhere/*.jsonl"]
    spec["stages"]["corpus"]["source"]["paths"] = ["data/*.jsonl", "missing/*.jsonl", "s3://bucket/x.jsonl"]
    write_spec(".", "paths.yaml", spec)
    assert cli_main(["submit", "paths.yaml", "--address", nowhere]) == 2
    err = capsys.readouterr().err
    assert "stages.tok.source.paths[0]: '../elsewhere/*.jsonl' is outside the current directory" in err
    assert "stages.corpus.source.paths[1]: 'missing/*.jsonl' matches nothing" in err
    assert err.count("\n  - ") == 2  # data/*.jsonl is shipped, the s3:// URI read on the cluster

    # The spec's own storage, ./.orchestrator, would be inside the job's temporary directory.
    write_spec(".", "local.yaml", tiny_pipeline("local", "file://./.orchestrator"))
    assert cli_main(["submit", "local.yaml", "--address", nowhere]) == 2
    assert "is relative" in capsys.readouterr().err


def test_an_unreachable_cluster_exits_2(tmp_path, monkeypatch, capsys, nowhere):
    monkeypatch.chdir(make_workdir(tmp_path))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # else the client would set it in this process for good
    write_spec(".", "tiny.yaml", tiny_pipeline("tiny", "file:///tmp/x"))
    assert cli_main(["submit", "tiny.yaml", "--address", nowhere]) == 2
    out = capsys.readouterr()
    assert f"cannot reach a Ray cluster at {nowhere}" in out.err and out.out == ""
