"""A pipeline on a remote Ray cluster through the Ray Jobs API: submit its driver, and find,
follow and stop what was submitted.

The driver is one Ray job: its submission id is the run id, so `ray job list/status/logs/stop`
name the same thing as `orchestrator status`, and a run id submitted twice cannot start two
drivers (Ray keeps a submission id for the cluster's lifetime). Its entrypoint is
`orchestrator run SPEC --run-id ID --storage URI` (the image has the project installed), and its
runtime environment's `working_dir` is a temporary copy of the pipeline file and of every local
file it names by a relative path, laid out as under the current directory: the driver and its
workers start in that copy on the cluster, so the relative paths resolve there as they do here.
An absolute path is read on the cluster as it is (a filesystem the nodes share, the image's
/app); a relative path outside the current directory cannot be shipped and is refused. Ray
unpacks the copy with new modification times, so a stage that reads shipped files does not hit
the cache of a local run of the same files: inputs meant to be cached across runs belong on S3.

Nothing of this machine's environment travels with the job: the nodes have their own
credentials (instance profiles, IRSA), and the job's metadata holds the pipeline's name and its
storage URI only. Ray's token comes from Ray's own settings (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token) and goes only into the requests' Authorization header.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

from jobs.fields import local_fields
from jobs.storage import Storage
from orchestrator import ray_internals
from orchestrator.errors import UserError
from orchestrator.records import RunRecord, load_record, save_record
from orchestrator.spec import PipelineSpec

PIPELINE_KEY, STORAGE_KEY = "orchestrator.pipeline", "orchestrator.storage"
"""Job metadata: which pipeline a job runs, and where its run record is."""
MAX_SHIPPED_BYTES = 100 << 20
"""Ray keeps the working_dir in its control store: large data belongs on S3."""
STOP_TIMEOUT_S = 60.0
"""Ray sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default)."""


# --- the job's contents -------------------------------------------------------------------

def storage_for_cluster(uri: str) -> str:
    """The storage URI as the driver on the cluster must get it: s3://, or an absolute directory."""
    if uri.startswith("s3://"):
        return uri
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    if "://" in path or not path:
        raise UserError(f"--storage {uri!r}: use s3://bucket/prefix, or file:///absolute/dir on a filesystem "
                        "that the cluster's nodes and this machine share")
    path = os.path.expanduser(path)
    if not os.path.isabs(path):
        raise UserError(f"storage {uri!r} is relative: on the cluster it would land inside the job's temporary "
                        "copy of the pipeline, where nothing can read it back; give --storage s3://bucket/prefix "
                        "(or an absolute file:// directory that the cluster's nodes and this machine share)")
    return "file://" + os.path.normpath(path)


def local_paths(spec: PipelineSpec) -> list[tuple[str, str, bool]]:
    """(field path, local path, is a source glob) of every local file or directory the spec names:
    the fields declared with `local=` (jobs.fields)."""
    found: list[tuple[str, str, bool]] = []
    for name, stage in spec.stages.items():
        for where, _, kind, value in local_fields(stage, f"stages.{name}"):
            if kind == "glob":  # a source's paths: s3:// URIs among them are read where they are
                found += [(f"{where}[{i}]", p, True) for i, p in enumerate(value) if not p.startswith("s3://")]
            else:
                found.append((where, value, False))
    return found


def files_to_ship(spec: PipelineSpec) -> list[str]:
    """The files (relative to the current directory) that the job must carry; every path that
    cannot be shipped is reported at once."""
    files: dict[str, None] = {}
    problems = []
    for where, raw, is_glob in local_paths(spec):
        path = raw[len("file://"):] if raw.startswith("file://") else raw
        if os.path.isabs(path):
            continue  # read on the cluster as it is
        rel = os.path.normpath(path)
        if rel == ".." or rel.startswith(".." + os.sep):
            problems.append(f"{where}: {raw!r} is outside the current directory ({os.getcwd()}), so it cannot be "
                            "shipped with the job; submit from a directory that holds it, or give an s3:// URI "
                            "or an absolute path that exists on the cluster")
            continue
        matched = sorted(glob.glob(rel, recursive=True)) if is_glob else ([rel] if os.path.exists(rel) else [])
        if is_glob:
            matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            problems.append(f"{where}: {raw!r} matches nothing under {os.getcwd()}: relative paths are shipped "
                            "from the current directory; give an s3:// URI or an absolute path on the cluster "
                            "to read data there")
        for m in matched:
            if os.path.isdir(m):
                for root, _, names in os.walk(m):
                    files.update((os.path.normpath(os.path.join(root, n)), None) for n in sorted(names))
            else:
                files[os.path.normpath(m)] = None
    if problems:
        raise UserError("cannot submit this pipeline:\n" + "\n".join(f"  - {p}" for p in problems))
    size = sum(os.path.getsize(f) for f in files)
    if size > MAX_SHIPPED_BYTES:
        raise UserError(f"the pipeline's local files come to {size / 2**20:.0f} MiB, more than the "
                        f"{MAX_SHIPPED_BYTES >> 20} MiB that a job carries; put large inputs on S3 (s3:// URIs)")
    return list(files)


@contextlib.contextmanager
def job_directory(spec_path: str, files: list[str]) -> Iterator[str]:
    """A temporary directory with the pipeline file (under its own name) and `files` at their
    relative paths: the job's working_dir. Removed on exit."""
    name = os.path.basename(spec_path)
    if name in files:
        raise UserError(f"{spec_path}: the pipeline file's name {name!r} is also one of its input files; rename one")
    with tempfile.TemporaryDirectory(prefix="orchestrator-job-") as tmp:
        shutil.copy2(spec_path, os.path.join(tmp, name))
        for f in files:
            os.makedirs(os.path.join(tmp, os.path.dirname(f)), exist_ok=True)
            shutil.copy2(f, os.path.join(tmp, f))
        yield tmp


def entrypoint(spec_name: str, run_id: str, storage_uri: str) -> str:
    return shlex.join(["orchestrator", "run", spec_name, "--run-id", run_id, "--storage", storage_uri])


# --- the cluster --------------------------------------------------------------------------

def open_client(address: str):
    """A Jobs API client for the cluster whose dashboard is at `address` (http://HOST:8265).

    Unreachable clusters and refused tokens are UserErrors: the fix is the address, the tunnel
    or the token, and nothing has been submitted.
    """
    ray_internals.check_ray_version()  # another Ray: one clear message now, not a missing part later
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _token_mode_if_token_configured()
    try:
        with _address_env_cleared():
            return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise UserError(f"the Ray cluster at {address} refused the request: {e}") from None
    except ConnectionError as e:
        raise UserError(f"cannot reach a Ray cluster at {address} ({e}); give --address as the dashboard's "
                        "URL (http://HOST:8265), and check that the cluster is up and the tunnel to it is open") from None


def _token_mode_if_token_configured() -> None:
    """Ray's client sends the token only when RAY_AUTH_MODE=token; `ray start` and
    `ray.init("auto")` turn that mode on by themselves when a token is configured, the Jobs client
    does not. Do as they do (an explicit RAY_AUTH_MODE is left as it is)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    if ray_internals.token_configured():
        os.environ["RAY_AUTH_MODE"] = "token"
        ray_internals.reload_ray_config()  # Ray read the mode when it was imported


@contextlib.contextmanager
def _address_env_cleared() -> Iterator[None]:
    """Ray's client prefers RAY_ADDRESS / RAY_API_SERVER_ADDRESS to the address it is given: an
    explicit --address must win, or a stale variable sends the job to another cluster."""
    names = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def submit(client, spec_path: str, spec: PipelineSpec, files: list[str], run_id: str,
           storage_uri: str) -> tuple[bool, object]:
    """Submit the pipeline, with `files` (from files_to_ship), as the job `run_id`, or find that
    job already there. Returns (whether a job was started, the job's JobDetails)."""
    existing = find_job(client, run_id)
    if existing is not None:
        return False, existing
    metadata = {PIPELINE_KEY: spec.name, STORAGE_KEY: storage_uri}
    with job_directory(spec_path, files) as working_dir:
        try:
            client.submit_job(entrypoint=entrypoint(os.path.basename(spec_path), run_id, storage_uri),
                              submission_id=run_id, runtime_env={"working_dir": working_dir}, metadata=metadata)
        except RuntimeError:
            existing = find_job(client, run_id)  # another submit of the same run id got there first
            if existing is None:
                raise
            return False, existing
    return True, client.get_job_info(run_id)


def find_job(client, run_id: str):
    """The job whose submission id is `run_id`, or None. (A missing job is an HTTP 404 that the
    client raises as a bare RuntimeError; the list is the unambiguous way to ask.)"""
    return next((job for job in client.list_jobs() if job.submission_id == run_id), None)


def require_job(client, run_id: str, address: str):
    job = find_job(client, run_id)
    if job is None:
        raise UserError(f"no Ray job {run_id!r} on the cluster at {address}; `orchestrator runs --address {address}` "
                        "lists the submitted runs")
    return job


def pipeline_jobs(client) -> list:
    """The cluster's jobs that `submit` started (oldest first)."""
    jobs = [job for job in client.list_jobs() if STORAGE_KEY in (job.metadata or {})]
    return sorted(jobs, key=lambda job: job.start_time or 0)


def job_storage(job) -> str | None:
    return (job.metadata or {}).get(STORAGE_KEY)


def job_summary(job) -> dict:
    return {"submission_id": job.submission_id, "job_id": job.job_id, "status": str(job.status),
            "message": job.message, "start_time": job.start_time, "end_time": job.end_time,
            "entrypoint": job.entrypoint}


def follow_job_logs(client, run_id: str, write: Callable[[str], None]):
    """Print the job's driver output as it comes, until the job ends; returns its final status."""
    async def tail() -> None:
        async for chunk in client.tail_job_logs(run_id):
            write(chunk)

    asyncio.run(tail())
    return client.get_job_status(run_id)


def stop_job(client, job, timeout_s: float = STOP_TIMEOUT_S, poll_s: float = 0.5,
             clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
    """Ask Ray to stop the job and wait until it says the job is over; returns (whether it was
    still running, its final status)."""
    if job.status.is_terminal():
        return False, job.status
    run_id = job.submission_id
    client.stop_job(run_id)
    deadline = clock() + timeout_s
    while not (status := client.get_job_status(run_id)).is_terminal():
        if clock() > deadline:
            raise RuntimeError(f"Ray has not stopped job {run_id} after {timeout_s:.0f}s (status {status})")
        sleep(poll_s)
    return True, status


def mark_stopped(storage: Storage, run_id: str) -> RunRecord | None:
    """After Ray has stopped the job: a record that still says running was left by a driver killed
    before it could write (SIGKILL); say what happened to it."""
    record = load_record(storage, run_id)
    if record is None or record.status not in ("pending", "running"):
        return record
    now = time.time()
    record.status, record.finished_at = "stopped", now
    for stage in record.stages.values():
        if stage.status == "running":
            stage.status, stage.error, stage.finished_at = "stopped", "stopped: Ray killed the driver", now
    save_record(storage, record)
    return record
