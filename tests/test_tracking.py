"""The `tracking:` section: its errors at validate (each naming the field and the fix), a tracker
whose package is missing (exit 2 naming the install command), and that tracking changes no hash.
The same pipeline tracked to a real MLflow server and to W&B offline: tests/test_tracking_local.py."""

from __future__ import annotations

import os
import sys

import pytest
import yaml

from jobs.storage import open_storage
from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.plan import make_plan
from orchestrator.spec import parse_spec
from orchestrator.tracking import flatten, numbers, redact

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data", "*.jsonl")
TOK = {"kind": "tokenizer", "source": {"paths": [DATA]}, "vocab_size": 4096}


def _spec(tracking=None) -> str:
    raw = {"name": "t", "stages": {"tok": TOK}}
    return yaml.safe_dump({**raw, "tracking": tracking} if tracking is not None else raw)


def _problems(tracking) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(_spec(tracking))
    return info.value.problems


def test_tracking_is_off_by_default_and_changes_no_hash(tmp_path):
    plain = parse_spec(_spec())
    tracked = parse_spec(_spec({"mlflow": {"tracking_uri": "http://127.0.0.1:5000"},
                                "wandb": {"project": "p", "mode": "offline"}, "required": True}))
    assert plain.tracking is None
    assert tracked.tracking.mlflow.experiment is None and tracked.tracking.wandb.entity is None
    assert tracked.spec_hash() == plain.spec_hash()
    storage = open_storage(f"file://{tmp_path}")
    assert [p.hash for p in make_plan(tracked, storage)] == [p.hash for p in make_plan(plain, storage)]


@pytest.mark.parametrize("tracking, expected", [
    ({}, "tracking: nothing to track to: give `mlflow: {}` and/or `wandb: {project: NAME}`, or remove `tracking`"),
    ({"mlflow": {"experiments": "x"}}, "tracking.mlflow.experiments: unknown field; did you mean 'experiment'? "
                                       "valid fields: experiment, tracking_uri"),
    ({"wandb": {"mode": "offline"}}, "tracking.wandb.project: required field missing"),
    ({"wandb": {"project": "p", "mode": "shared"}}, "tracking.wandb.mode: Input should be 'online' or 'offline' "
                                                    "(got 'shared')"),
    ({"mlflow": {}, "required": "sometimes"}, "tracking.required: Input should be a valid boolean"),
])
def test_tracking_errors_name_the_field_and_the_fix(tracking, expected):
    problems = _problems(tracking)
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_credentials_in_the_tracking_uri_are_refused():
    [problem] = _problems({"mlflow": {"tracking_uri": "https://alice:s3cret@mlflow.example.com"}})
    assert problem.startswith("tracking.mlflow.tracking_uri: holds credentials; give the URI without them and set "
                              "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    assert "s3cret" not in problem.split("(got")[0]


@pytest.mark.parametrize("tool", ["mlflow", "wandb"])
def test_a_tracker_without_its_package_is_exit_2_at_validate(tool, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, tool, None)  # what `import` sees when the package is not installed
    spec = tmp_path / "p.yaml"
    spec.write_text(_spec({"mlflow": {}} if tool == "mlflow" else {"wandb": {"project": "p"}}))
    assert main(["validate", str(spec)]) == 2
    assert (f"tracking.{tool}: the {tool} package is not installed; pip install 'ray-llm-orchestrator[{tool}]'"
            in capsys.readouterr().err)


def test_params_and_metrics_are_flattened_to_dotted_keys():
    assert flatten({"a": {"b": [{"c": 1}], "d": [1, 2]}, "e": None}) == {"a.b.0.c": 1, "a.d": [1, 2], "e": None}
    record_metrics = {"final_loss": 2.5, "loss_history": [[2, 3.0]], "mfu": None, "speed": {"compile": "off"},
                      "tokens_per_source": {"web": 10}, "restarts": 0, "ok": True}
    assert numbers(record_metrics) == {"final_loss": 2.5, "tokens_per_source.web": 10.0, "restarts": 0.0}


def test_credentials_in_messages_are_redacted():
    assert redact("POST https://bob:tok@mlflow.example.com/api failed") == "POST https://***@mlflow.example.com/api failed"
