"""The cache key covers exactly what changes a stage's output: every spec field is declared next to
itself as output (hashed) or operational (not hashed), and the plan keeps to it. No Ray."""

from __future__ import annotations

import copy
import typing

import pytest
import yaml
from pydantic import BaseModel

from jobs.commit import write_commit
from jobs.fields import hashing_of
from jobs.storage import open_storage
from orchestrator.kinds import KINDS
from orchestrator.plan import COMMIT_FILE, make_plan
from orchestrator.spec import parse_spec


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _all_fields() -> list[tuple[str, str, object]]:
    """(model, field, FieldInfo) of every field of every stage kind, nested models included."""
    seen, found, todo = set(), [], [kind.spec for kind in KINDS.values()]
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            found.append((model.__name__, name, info))
            todo += _models_in(info.annotation)
    return found


def test_every_field_of_every_stage_kind_is_classified():
    unclassified = [f"{model}.{name}" for model, name, info in _all_fields() if hashing_of(info) is None]
    assert not unclassified, ("declare each as jobs.fields.output(...) (changes the output: hashed) or "
                              f"operational(...) (only how it runs): {unclassified}")


def test_the_operational_fields_are_those_that_only_change_how_a_stage_runs():
    operational = {f"{model}.{name}" for model, name, info in _all_fields() if hashing_of(info) == "operational"}
    # Subclasses repeat their base's fields: compare by field name.
    assert {name.split(".")[1] for name in operational} == {
        "log_every", "cpus_per_worker", "resources_per_worker", "max_failures", "cpus",
        "activation_checkpointing",  # tests/test_speed.py: the same losses with and without
        "dedup_keys_per_task"}  # tests/test_dedup_units.py: the same drops whatever the number of key ranges


def _hashes(raw: dict, storage) -> dict[str, str]:
    return {p.name: p.hash for p in make_plan(parse_spec(yaml.safe_dump(raw)), storage)}


OPERATIONAL_CHANGES = [
    ("pretrain", "log_every", 1), ("pretrain", "cpus_per_worker", 0.5), ("pretrain", "max_failures", 0),
    ("pretrain", "resources_per_worker", {"trainer": 1}), ("sft", "log_every", 3), ("sft", "cpus_per_worker", 2),
    ("sft", "max_failures", 5), ("sft", "resources_per_worker", {"trainer": 1}), ("eval", "cpus", 2),
]


@pytest.mark.parametrize("stage, field, value", OPERATIONAL_CHANGES)
def test_changing_an_operational_field_keeps_every_hash(pipeline, tmp_path, stage, field, value):
    storage = open_storage(f"file://{tmp_path}/store")
    changed = copy.deepcopy(pipeline)
    changed["stages"][stage][field] = value
    assert _hashes(changed, storage) == _hashes(pipeline, storage)


def test_a_committed_output_stays_cached_after_operational_changes(pipeline, tmp_path):
    """The first user report: log_every, cpus_per_worker and max_failures changed on a finished
    pipeline reran 4 of its 6 stages."""
    storage = open_storage(f"file://{tmp_path}/store")
    for p in make_plan(parse_spec(yaml.safe_dump(pipeline)), storage):
        assert write_commit(storage.sub(p.key), COMMIT_FILE, {}, {"inputs": p.inputs})
    changed = copy.deepcopy(pipeline)
    for stage in ("pretrain", "sft"):
        changed["stages"][stage].update(log_every=1, cpus_per_worker=0.5, max_failures=0)
    plan = make_plan(parse_spec(yaml.safe_dump(changed)), storage)
    assert [(p.name, p.cached, p.reason) for p in plan] == [(p.name, True, "cached") for p in plan]


@pytest.mark.parametrize("stage, field, value, changed", [
    ("pretrain", "lr", 1e-3, {"pretrain", "sft", "eval"}),
    ("pretrain", "num_workers", 1, {"pretrain", "sft", "eval"}),
    ("sft", "steps", 3, {"sft", "eval"}),
    ("eval", "batch_size", 4, {"eval"}),
    ("corpus", "shard_mb", 1.0, {"corpus", "pretrain", "sft", "eval"}),
])
def test_changing_an_output_field_changes_its_hash_and_its_downstream_hashes(pipeline, tmp_path, stage, field,
                                                                            value, changed):
    storage = open_storage(f"file://{tmp_path}/store")
    before = _hashes(pipeline, storage)
    raw = copy.deepcopy(pipeline)
    raw["stages"][stage][field] = value
    after = _hashes(raw, storage)
    assert {name for name in before if before[name] != after[name]} == changed


def test_a_deepspeed_config_file_is_fingerprinted(pipeline, tmp_path):
    storage = open_storage(f"file://{tmp_path}/store")
    config = tmp_path / "ds.json"
    config.write_text('{"gradient_clipping": 1.0}')
    pipeline["stages"]["pretrain"]["deepspeed_config"] = str(config)
    before = _hashes(pipeline, storage)
    config.write_text('{"gradient_clipping": 0.5}')
    assert _hashes(pipeline, storage)["pretrain"] != before["pretrain"]



def test_the_run_spec_hash_ignores_operational_fields_but_not_output_fields(pipeline):
    """A run resumed after an operational change (more restarts, another log interval) is accepted
    as the same run; one whose stages compute something else is not."""
    spec_hash = lambda raw: parse_spec(yaml.safe_dump(raw)).spec_hash()  # noqa: E731
    changed = copy.deepcopy(pipeline)
    for stage, field, value in OPERATIONAL_CHANGES:
        changed["stages"][stage][field] = value
    assert spec_hash(changed) == spec_hash(pipeline)
    changed["stages"]["pretrain"]["lr"] = 1e-3
    assert spec_hash(changed) != spec_hash(pipeline)
