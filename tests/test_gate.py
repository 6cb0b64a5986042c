"""Unit tests of the regression gate (orchestrator/gate.py): which runs move the `latest` / `best`
aliases, the gate result in the run record, and the console's summary line. No Ray; local storage
under tmp_path, records built by hand."""

from __future__ import annotations

import io
import json

import pytest

from jobs.storage import open_storage
from orchestrator.console import Console
from orchestrator.gate import GateResult, alias_key, apply_gate, read_alias
from orchestrator.records import RunRecord, StageRecord, load_record, record_key, save_record
from orchestrator.schedule_spec import GateMetric, GateSpec

EM = "sft_colors/colors/exact_match"
PPL = "pretrain/perplexity/perplexity"
GATE = GateSpec(stage="eval", model="sft_colors", metrics=[
    GateMetric(name=EM, higher_is_better=True, max_regression=0.02),
    GateMetric(name=PPL, higher_is_better=False, max_regression=5.0),
])


@pytest.fixture
def storage(tmp_path):
    return open_storage("file://" + str(tmp_path / "store"))


def _stage(kind: str, name: str, metrics: dict | None = None, status: str = "succeeded", slash: bool = False) -> StageRecord:
    uri = f"file:///store/stages/{name}-1a2b3c4d" + "/" * slash
    return StageRecord(kind=kind, status=status, hash="0" * 64, output_uri=uri, attempts=1,
                       started_at=1000.0, finished_at=1010.0, metrics=metrics or {})


def _record(run_id: str, em: float | None = 0.5, ppl: float | None = 40.0, eval_status: str = "succeeded",
            slash: bool = False) -> RunRecord:
    pretrain = {"tasks": {"colors": {"exact_match": 0.1, "num_examples": 8}}}
    if ppl is not None:
        pretrain["perplexity"] = {"perplexity": ppl, "loss": 3.7, "num_tokens": 5000}
    colors = {"num_examples": 8} | ({"exact_match": em} if em is not None else {})
    results = {"pretrain": pretrain, "sft_colors": {"tasks": {"colors": colors}}}
    return RunRecord(
        run_id=run_id, pipeline="nightly", spec_hash="f" * 64, storage="file:///store", status="succeeded",
        started_at=1000.0, finished_at=1100.0,
        stages={
            "pretrain": _stage("pretrain", "pretrain", {"final_loss": 3.5, "tokens_per_s": 100.0}),
            "sft_colors": _stage("finetune", "sft_colors", {"final_loss": 2.5, "tokens_per_s": 100.0}, slash=slash),
            "eval": _stage("evaluate", "eval", {"results": results}, status=eval_status),
        })


def _alias_bytes(storage) -> dict[str, bytes | None]:
    out = {}
    for name in ("latest", "best"):
        try:
            out[name] = storage.read_bytes(alias_key("nightly", name))
        except FileNotFoundError:
            out[name] = None
    return out


def _promote_first(storage, em: float = 0.5, ppl: float = 40.0) -> GateResult:
    result = apply_gate(GATE, _record("r1", em=em, ppl=ppl), storage, now=1.0)
    assert result.status == "promoted"
    return result


# --- promotion -----------------------------------------------------------------------------------

def test_first_run_is_promoted_and_both_aliases_point_to_its_export(storage):
    result = apply_gate(GATE, _record("r1"), storage, now=1234.5)
    assert result.status == "promoted"
    assert result.reason == "first promoted run"
    assert result.baseline_run is None
    assert result.moved == ["latest", "best"]
    assert result.export_uri == "file:///store/stages/sft_colors-1a2b3c4d/hf/"
    assert [(c.name, c.value, c.baseline, c.passed) for c in result.checks] == [(EM, 0.5, None, True), (PPL, 40.0, None, True)]
    latest = read_alias(storage, "nightly", "latest")
    assert latest == {"run_id": "r1", "pipeline": "nightly", "model_stage": "sft_colors",
                      "export_uri": "file:///store/stages/sft_colors-1a2b3c4d/hf/",
                      "metrics": {EM: 0.5, PPL: 40.0}, "promoted_at": 1234.5}
    assert read_alias(storage, "nightly", "best") == latest
    assert storage.exists("aliases/nightly/latest.json") and storage.exists("aliases/nightly/best.json")


def test_export_uri_with_a_trailing_slash_has_no_double_slash(storage):
    result = apply_gate(GATE, _record("r1", slash=True), storage, now=1.0)
    assert result.export_uri == "file:///store/stages/sft_colors-1a2b3c4d/hf/"
    assert read_alias(storage, "nightly", "latest")["export_uri"] == result.export_uri


def test_read_alias_is_none_before_any_promotion(storage):
    assert read_alias(storage, "nightly", "latest") is None
    assert read_alias(storage, "nightly", "best") is None


def test_better_run_is_promoted_and_best_moves(storage):
    _promote_first(storage)
    result = apply_gate(GATE, _record("r2", em=0.6, ppl=38.0), storage, now=2.0)
    assert result.status == "promoted"
    assert result.baseline_run == "r1"
    assert result.moved == ["latest", "best"]
    assert all(c.passed for c in result.checks)
    assert [(c.baseline, c.limit) for c in result.checks] == [(0.5, pytest.approx(0.48)), (40.0, 45.0)]
    assert read_alias(storage, "nightly", "latest")["run_id"] == "r2"
    assert read_alias(storage, "nightly", "best")["run_id"] == "r2"
    assert "baseline run r1" in result.reason


def test_slightly_worse_run_within_threshold_moves_latest_but_not_best(storage):
    _promote_first(storage)
    best_before = _alias_bytes(storage)["best"]
    result = apply_gate(GATE, _record("r2", em=0.49, ppl=44.0), storage, now=2.0)
    assert result.status == "promoted"
    assert result.moved == ["latest"]
    assert read_alias(storage, "nightly", "latest")["run_id"] == "r2"
    assert _alias_bytes(storage)["best"] == best_before
    # the next run is compared with r2 (latest), not with r1 (best)
    third = apply_gate(GATE, _record("r3", em=0.475, ppl=44.0), storage, now=3.0)
    assert third.status == "promoted" and third.baseline_run == "r2" and third.moved == ["latest"]


def test_a_value_exactly_at_the_threshold_passes(storage):
    _promote_first(storage, em=0.48)
    result = apply_gate(GATE, _record("r2", em=0.46, ppl=45.0), storage, now=2.0)  # 0.48 - 0.02, 40 + 5
    assert result.status == "promoted", result.reason


def test_worse_run_beyond_threshold_regresses_and_moves_nothing(storage):
    _promote_first(storage)
    apply_gate(GATE, _record("r2", em=0.49, ppl=41.0), storage, now=2.0)  # latest → r2, best stays r1
    before = _alias_bytes(storage)
    assert before["latest"] != before["best"]
    result = apply_gate(GATE, _record("r3", em=0.41, ppl=41.0), storage, now=3.0)
    assert result.status == "regressed"
    assert result.moved == []
    assert result.baseline_run == "r2"
    assert _alias_bytes(storage) == before  # byte-identical
    failed = [c.name for c in result.checks if not c.passed]
    assert failed == [EM]
    em = result.checks[0]
    assert (em.value, em.baseline, em.limit) == (0.41, 0.49, pytest.approx(0.47))
    assert result.reason == f"{EM} 0.41 < 0.49 - 0.02 (baseline run r2)"


def test_lower_is_better_perplexity_both_directions(storage):
    _promote_first(storage, ppl=40.0)
    better = apply_gate(GATE, _record("r2", ppl=30.0), storage, now=2.0)
    assert better.status == "promoted" and better.checks[1].passed and better.checks[1].limit == 45.0
    assert read_alias(storage, "nightly", "latest")["metrics"][PPL] == 30.0
    before = _alias_bytes(storage)
    worse = apply_gate(GATE, _record("r3", ppl=35.5), storage, now=3.0)  # > 30 + 5
    assert worse.status == "regressed"
    assert [c.name for c in worse.checks if not c.passed] == [PPL]
    assert worse.reason == f"{PPL} 35.5 > 30 + 5 (baseline run r2)"
    assert _alias_bytes(storage) == before


def test_lower_is_better_first_metric_decides_best(storage):
    gate = GateSpec(stage="eval", model="sft_colors",
                    metrics=[GateMetric(name=PPL, higher_is_better=False, max_regression=5.0)])
    assert apply_gate(gate, _record("r1", ppl=40.0), storage, now=1.0).moved == ["latest", "best"]
    assert apply_gate(gate, _record("r2", ppl=39.0), storage, now=2.0).moved == ["latest", "best"]  # lower: better
    assert apply_gate(gate, _record("r3", ppl=42.0), storage, now=3.0).moved == ["latest"]  # worse, in threshold
    assert apply_gate(gate, _record("r4", ppl=42.0), storage, now=4.0).moved == ["latest"]  # not strictly better
    assert read_alias(storage, "nightly", "best")["run_id"] == "r2"
    assert read_alias(storage, "nightly", "latest")["run_id"] == "r4"


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("record, missing", [
    (_record("r2", em=None), "no metric 'exact_match'"),
    (_record("r2", ppl=None), "pretrain has no perplexity result"),
])
def test_missing_metric_is_an_error_and_moves_nothing(storage, record, missing):
    _promote_first(storage)
    before = _alias_bytes(storage)
    result = apply_gate(GATE, record, storage, now=2.0)
    assert result.status == "error"
    assert result.moved == []
    assert missing in result.reason and "nothing promoted" in result.reason
    assert (EM if "exact_match" in missing else PPL) in result.reason
    assert _alias_bytes(storage) == before


def test_missing_metric_on_the_first_run_writes_no_alias(storage):
    result = apply_gate(GATE, _record("r1", em=None), storage, now=1.0)
    assert result.status == "error" and EM in result.reason
    assert _alias_bytes(storage) == {"latest": None, "best": None}


def test_failed_gate_stage_is_an_error(storage):
    result = apply_gate(GATE, _record("r1", eval_status="failed"), storage, now=1.0)
    assert result.status == "error" and "eval did not succeed" in result.reason
    assert _alias_bytes(storage) == {"latest": None, "best": None}


def test_corrupt_alias_is_an_error_not_an_exception(storage):
    storage.write_bytes(alias_key("nightly", "latest"), b"{not json")
    result = apply_gate(GATE, _record("r1"), storage, now=1.0)
    assert result.status == "error" and "latest.json is not valid JSON" in result.reason
    with pytest.raises(ValueError, match="not valid JSON"):
        read_alias(storage, "nightly", "latest")


def test_baseline_without_a_new_metric_passes_it(storage):
    one = GateSpec(stage="eval", model="sft_colors", metrics=[GATE.metrics[0]])
    apply_gate(one, _record("r1"), storage, now=1.0)
    result = apply_gate(GATE, _record("r2", ppl=1000.0), storage, now=2.0)  # gate gained the perplexity metric
    assert result.status == "promoted"
    assert (result.checks[1].baseline, result.checks[1].passed) == (None, True)


# --- run record and console ----------------------------------------------------------------------

def test_record_with_gate_result_round_trips(storage):
    record = _record("r1")
    record.gate = apply_gate(GATE, record, storage, now=1.0)
    save_record(storage, record)
    loaded = load_record(storage, "r1")
    assert loaded == record
    assert isinstance(loaded.gate, GateResult) and loaded.gate.status == "promoted"


def test_old_record_without_gate_loads(storage):
    data = json.loads(_record("old").model_dump_json())
    del data["gate"]
    storage.write_bytes(record_key("old"), json.dumps(data).encode())
    loaded = load_record(storage, "old")
    assert loaded is not None and loaded.gate is None


def _summary(record: RunRecord) -> list[str]:
    out = io.StringIO()
    Console(out).summary(record)
    return out.getvalue().splitlines()


def test_console_summary_says_what_the_gate_did(storage):
    first = _record("r1")
    without = _summary(first)
    assert not any(line.startswith("gate:") for line in without)
    first.gate = apply_gate(GATE, first, storage, now=1.0)
    lines = _summary(first)
    assert "gate:   promoted (latest, best → file:///store/stages/sft_colors-1a2b3c4d/hf/)" in lines
    assert [line for line in lines if not line.startswith("gate:")] == without  # otherwise unchanged

    worse = _record("r2", em=0.41)
    worse.gate = apply_gate(GATE, worse, storage, now=2.0)
    assert f"gate:   REGRESSED — {EM} 0.41 < 0.5 - 0.02 (baseline run r1); latest stays at run r1" in _summary(worse)

    missing = _record("r3", em=None)
    missing.gate = apply_gate(GATE, missing, storage, now=3.0)
    assert any(line.startswith("gate:   ERROR — missing metric") for line in _summary(missing))
