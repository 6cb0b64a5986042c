"""Run records (`runs/<run_id>/run.json`, a contract): what a run did, stage by stage.

The record is rewritten whole after every state change, with an atomic write, so a reader (or a
driver resuming after `kill -9`) always sees a complete record of the last finished transition.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Literal

from pydantic import BaseModel, Field

from jobs.storage import Storage
from orchestrator.errors import UserError
from orchestrator.gate import GateResult

Status = Literal["pending", "running", "succeeded", "failed", "stopped"]
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StageRecord(BaseModel):
    kind: str
    status: Status = "pending"
    cached: bool = False
    """True when the output was already committed and the stage did not run."""
    reason: str = ""
    """Why the stage ran, or `cached`."""
    hash: str
    output_uri: str
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    metrics: dict = Field(default_factory=dict)
    error: str | None = None


class RunRecord(BaseModel):
    run_id: str
    pipeline: str
    spec_hash: str
    storage: str
    status: Status = "pending"
    attempts: int = 0
    """How many times a driver started this run (resuming increments it)."""
    started_at: float = Field(default_factory=time.time)
    finished_at: float | None = None
    stages: dict[str, StageRecord] = Field(default_factory=dict)
    gate: GateResult | None = None
    """The regression gate's decision (pipelines with a `gate:`); None before it ran, or without one."""


def new_run_id(pipeline: str) -> str:
    return f"{pipeline}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def validate_run_id(run_id: str) -> str:
    if not RUN_ID.fullmatch(run_id):
        raise UserError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' (at most 128), starting with a letter or digit")
    return run_id


def record_key(run_id: str) -> str:
    return f"runs/{run_id}/run.json"


def save_record(storage: Storage, record: RunRecord) -> None:
    storage.write_bytes(record_key(record.run_id), record.model_dump_json(indent=2).encode())


def load_record(storage: Storage, run_id: str) -> RunRecord | None:
    try:
        return RunRecord.model_validate_json(storage.read_bytes(record_key(validate_run_id(run_id))))
    except FileNotFoundError:
        return None


def list_records(storage: Storage) -> list[RunRecord]:
    keys = [o.key for o in storage.list("runs/") if o.key.endswith("/run.json") and o.key.count("/") == 2]
    records = [RunRecord.model_validate_json(storage.read_bytes(k)) for k in keys]
    return sorted(records, key=lambda r: r.started_at)
