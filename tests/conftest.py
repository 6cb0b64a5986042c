import os
import uuid

import boto3
import pytest

from s3_server import FaultyS3Proxy, start_moto_server

# --- Order: the longest files first ------------------------------------------------------------

# `make test` runs files on two xdist workers in collection order: the longest ones first, so that
# the two end together rather than one finishing a long file alone. The costliest files on 2 cores,
# costliest first (each run alone); an out-of-date list costs time, never a test.
LONGEST_FILES = ("test_train_local.py", "test_pipeline_local.py", "test_lease_local.py",
                 "test_preprocess_local.py", "test_autoscaling_local.py", "test_submit_local.py",
                 "test_nightly_local.py", "test_lora_local.py", "test_tracking_local.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: the other files, and every file's tests, keep their order


# --- A pipeline of every stage kind, for the tests that validate and plan it -----------------------

@pytest.fixture
def pipeline(tmp_path) -> dict:
    """tok -> corpus -> pretrain -> sft -> eval over a 10-document jsonl in tmp_path, as the dict a
    pipeline file parses to (a test changes it before parsing)."""
    source = tmp_path / "part-0.jsonl"
    source.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(10)))
    src = {"paths": [str(source)]}
    return {"name": "t", "stages": {
        "tok": {"kind": "tokenizer", "source": src, "vocab_size": 300},
        "corpus": {"kind": "preprocess", "source": src, "tokenizer": "tok", "seq_len": 64},
        "pretrain": {"kind": "pretrain", "data": "corpus", "steps": 4, "model": {"max_position_embeddings": 64}},
        "sft": {"kind": "finetune", "init": "pretrain", "data": "corpus", "steps": 2},
        "eval": {"kind": "evaluate", "models": ["pretrain", "sft"], "data": "corpus"},
    }}


# --- S3: a real S3 protocol server (moto) on 127.0.0.1 -------------------------------------

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Unset for the session so that a developer's own AWS settings cannot leak into the tests.
_S3_ENV_CLEARED = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server for the session; yields its endpoint URL, set as AWS_ENDPOINT_URL."""
    server, endpoint = start_moto_server()
    env = {**_S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    saved = {name: os.environ.get(name) for name in [*env, *_S3_ENV_CLEARED]}
    os.environ.update(env)
    for name in _S3_ENV_CLEARED:
        os.environ.pop(name, None)
    try:
        yield endpoint
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the moto server; yields 's3://<bucket>'."""
    bucket = f"test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}"


@pytest.fixture
def s3_fault_proxy(s3_server):
    """A FaultyS3Proxy in front of the moto server (fail_rate 0.3, seeded). Point boto3 at it
    with `monkeypatch.setenv("AWS_ENDPOINT_URL", s3_fault_proxy.url)`."""
    proxy = FaultyS3Proxy(s3_server, fail_rate=0.3, seed=1234)
    try:
        yield proxy
    finally:
        proxy.stop()


# --- Ray: an embedded instance per test ------------------------------------------------------

@pytest.fixture
def start_ray(monkeypatch):
    """`start_ray(**env)` (re)starts an embedded 2-CPU Ray whose workers see `env`: workers
    inherit the environment of the moment Ray starts, so fault injection and endpoints that a
    test changes need a restart. Ray is shut down after the test."""
    import ray

    from orchestrator.ray_runtime import WORKER_ENV

    def start(**env):
        ray.shutdown()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"env_vars": WORKER_ENV})

    yield start
    ray.shutdown()
