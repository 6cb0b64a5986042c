"""Secure defaults: a secret in a run's environment (a canary AWS secret key, which the moto S3
server accepts like any other) reaches none of what a run leaves behind: run records, stage logs,
reports, driver log files, every object in the bucket, and the Ray job of a submitted run (its
metadata, runtime environment, entrypoint and driver output).

One run on an embedded Ray with the canary in the CLI's environment, one submitted to a Ray head
whose nodes hold the canary, as a cluster's nodes hold their own credentials.
"""

from __future__ import annotations

import json
import os
import uuid

import boto3
import pytest

from test_submit_local import make_workdir, ray_head, tiny_pipeline, write_spec

pytestmark = pytest.mark.local

CANARY = f"canary-{uuid.uuid4()}"


@pytest.fixture(scope="module")
def head(s3_server):
    with ray_head({"AWS_SECRET_ACCESS_KEY": CANARY}) as h:
        yield h


def test_a_secret_in_the_environment_appears_nowhere(head, s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY)
    workdir = make_workdir(tmp_path / "work")
    spec = write_spec(workdir, "tiny.yaml", tiny_pipeline("tiny", f"{s3_bucket}/unused"))
    local_logs = str(tmp_path / "logs")
    env = {**head.env, "ORCHESTRATOR_LOG_DIR": local_logs}
    assert env["AWS_SECRET_ACCESS_KEY"] == CANARY and head.env["AWS_SECRET_ACCESS_KEY"] == CANARY

    local = head.cli("run", spec, "--storage", f"{s3_bucket}/local", "--run-id", "local-1", cwd=workdir, env=env)
    assert local.returncode == 0, local.stderr
    submitted = head.cli("submit", spec, "--address", head.address, "--storage", f"{s3_bucket}/remote",
                         "--run-id", "remote-1", cwd=workdir, env=env)
    assert submitted.returncode == 0, submitted.stderr
    followed = head.cli("logs", "remote-1", "-f", "--address", head.address, env=env)
    assert "run remote-1: succeeded" in followed.stdout, followed.stdout + followed.stderr
    status = head.cli("status", "remote-1", "--address", head.address, "--json", env=env)
    assert json.loads(status.stdout)["status"] == "succeeded"

    client = head.client()
    job = client.get_job_info("remote-1")
    assert job.status == "SUCCEEDED" and job.metadata and job.runtime_env and job.entrypoint
    places = {"the Ray job (metadata, runtime env, entrypoint, ...)": json.dumps(job.model_dump(mode="json")),
              "the job's driver output": client.get_job_logs("remote-1")}
    for name, result in {"run": local, "submit": submitted, "logs -f": followed, "status": status}.items():
        places[f"`orchestrator {name}` output"] = result.stdout + result.stderr

    log_files = [os.path.join(local_logs, "local-1.log"), os.path.join(head.driver_log_dir, "remote-1.log")]
    for path in log_files:
        with open(path) as f:
            places[path] = f.read()

    s3 = boto3.client("s3")
    bucket = s3_bucket.removeprefix("s3://")
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]
    for prefix, run_id in (("local", "local-1"), ("remote", "remote-1")):
        for kept in ("run.json", "logs/tok.log", "logs/corpus.log", "report.md"):
            assert f"{prefix}/runs/{run_id}/{kept}" in keys
    for key in keys:
        places[f"{s3_bucket}/{key}"] = key + s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode(errors="replace")

    leaks = [name for name, text in places.items() if CANARY in text]
    assert not leaks, f"the canary secret appears in: {leaks}"
