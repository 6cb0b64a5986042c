"""lm-evaluation-harness tasks in the evaluate stage (jobs/harness.py), with the real lm-eval: a
local task YAML through the stage (`orchestrator run`, embedded Ray) gives the numbers lm-eval's own
CLI gives on the same export, and those of the native multiple-choice task on the same rows; the
same rows from S3 (moto) give the same numbers; the report shows the task and the gate reads its
metric; validate reports a missing extra (find_spec is the seam), a broken YAML, missing data, and
a name lm-eval's registry does not know. No network: the model is test_evaluate's tiny export."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import boto3
import pytest
import yaml

from jobs.fields import local_fields
from jobs.storage import open_storage
from orchestrator.cli import main
from orchestrator.gate import alias_key, apply_gate
from orchestrator.kinds import KINDS
from orchestrator.kinds.base import LocalPath
from orchestrator.kinds.evaluate import model_label
from orchestrator.records import StageRecord, load_record
from orchestrator.schedule_spec import GateMetric, GateSpec
from orchestrator.spec import load_spec
from test_evaluate import trained_dir, untrained_dir  # noqa: F401 (fixtures: the tiny trained export)

pytestmark = pytest.mark.local

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLACES = ["mat.", "park.", "barn."]
DOINGS = ["sat on the mat.", "ran to the park.", "slept in the barn."]
# Contexts end with a space and the YAML's target_delimiter is "", so that lm-eval scores exactly
# the (context, choice) pairs the native task scores. No two rows give the same context + choice
# text: lm-eval 0.4.13's logits cache (on by default) scores such a pair split at another place
# from the wrong positions (it gathers the leading, not the trailing, log-probs of the shared
# forward pass), so lm-eval and the native scorer would then differ.
ROWS = [
    {"context": "the cat sat on the ", "choices": PLACES, "answer": 0},
    {"context": "the dog ran to the ", "choices": PLACES, "answer": 1},
    {"context": "the owl slept in the ", "choices": PLACES, "answer": 2},
    {"context": "a cat ", "choices": DOINGS, "answer": 0},
    {"context": "a dog ", "choices": DOINGS, "answer": 1},
    {"context": "an owl ", "choices": DOINGS, "answer": 2},
    {"context": "the fox hid on the ", "choices": ["hill.", "road.", "bed."], "answer": 0},
    {"context": "the cow stood on the ", "choices": ["rug.", "log."], "answer": 1},
    {"context": "the bird ", "choices": ["sat on the log.", "ran to the barn."], "answer": 1},
    {"context": "the dog slept on the ", "choices": ["bed.", "hill.", "road.", "rug."], "answer": 3},
]
TASK_YAML = """\
task: animals_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""
METRICS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


def _workdir(path) -> str:
    """A pipeline's working directory: rows.jsonl, lm_tasks/animals.yaml reading it (relative to
    the current directory, as lm-eval reads data files)."""
    os.makedirs(path / "lm_tasks", exist_ok=True)
    (path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (path / "lm_tasks" / "animals.yaml").write_text(TASK_YAML.format(data="rows.jsonl"))
    return str(path)


def _pipeline(path, model_dir: str, tasks: list[dict], storage: str, **extra) -> str:
    raw = {"name": "lm-eval-test", "storage": storage, **extra, "stages": {
        "eval": {"kind": "evaluate", "models": [{"path": model_dir}], "batch_size": 4, "tasks": tasks}}}
    (path / "pipeline.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path / "pipeline.yaml")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, trained_dir, s3_server):  # noqa: F811 (the imported fixture)
    """The evaluate stage's run (a native task, the lm-eval task, the lm-eval task on S3) and
    lm-eval's CLI on the same export: (run record, storage, model label, CLI results)."""
    work = tmp_path_factory.mktemp("work")
    cwd = _workdir(work)
    bucket = "lm-eval-data"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    boto3.client("s3", endpoint_url=s3_server).upload_file(str(work / "rows.jsonl"), bucket, "mc/rows.jsonl")
    (work / "animals_s3.yaml").write_text(TASK_YAML.format(data=f"s3://{bucket}/mc/rows.jsonl"))
    storage = f"file://{tmp_path_factory.mktemp('store')}"
    spec = _pipeline(work, trained_dir, [
        {"name": "animals", "type": "multiple_choice", "path": "rows.jsonl"},
        {"name": "animals_lm", "type": "lm_eval", "yaml": "lm_tasks/animals.yaml"},
        {"name": "animals_s3", "type": "lm_eval", "yaml": "animals_s3.yaml"},
    ], storage)
    env = {**os.environ, "ORCHESTRATOR_LOG_DIR": str(work / "logs"), "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", spec, "--run-id", "lm1"], cwd=cwd,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cli = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf",
                          "--model_args", f"pretrained={trained_dir}", "--tasks", "animals_mc",
                          "--include_path", str(work / "lm_tasks"), "--device", "cpu", "--batch_size", "4",
                          "--output_path", str(work / "cli")], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
    [results_file] = glob.glob(str(work / "cli" / "**" / "results_*.json"), recursive=True)
    with open(results_file) as f:
        cli_results = json.load(f)
    store = open_storage(storage)
    return load_record(store, "lm1"), store, model_label(LocalPath(path=trained_dir)), cli_results


def test_a_local_task_yaml_gives_the_numbers_of_lm_evals_cli(evaluated):
    record, store, label, cli = evaluated
    tasks = record.stages["eval"].metrics["results"][label]["tasks"]
    assert list(tasks) == ["animals", "animals_lm", "animals_s3"]  # in the spec's order
    expected = {m: cli["results"]["animals_mc"][f"{m},none"] for m in METRICS}
    assert {m: tasks["animals_lm"][m] for m in METRICS} == expected
    assert tasks["animals_lm"]["num_examples"] == cli["n-samples"]["animals_mc"]["effective"] == len(ROWS)
    assert tasks["animals_s3"] == tasks["animals_lm"]  # the same rows, read from S3
    # lm-eval and the native scorer agree on the same (context, choice) pairs.
    assert (tasks["animals"]["acc"], tasks["animals"]["acc_norm"]) == (expected["acc"], expected["acc_norm"])
    assert expected["acc"] > 0.5  # well above chance: the model learned the memorized lines

    out = open_storage(record.stages["eval"].output_uri)
    staged = yaml.safe_load(out.read_bytes("tasks/animals_lm/task.yaml"))
    assert staged["task"] == "animals_mc" and staged["dataset_kwargs"]["data_files"] == {"test": "data/0-rows.jsonl"}
    assert out.read_bytes("tasks/animals_s3/data/0-rows.jsonl") == out.read_bytes("tasks/animals_lm/data/0-rows.jsonl")
    assert "animals_lm (acc)" in store.read_bytes("runs/lm1/report.md").decode()
    evaluate = KINDS["evaluate"]
    summary = evaluate.summarize(evaluate.results_of(record.stages["eval"].metrics))
    assert f"animals_lm acc {expected['acc']:.3f}" in summary


def test_the_gate_reads_an_lm_eval_metric(evaluated, tmp_path):
    record, _, label, cli = evaluated
    acc = cli["results"]["animals_mc"]["acc,none"]
    trained = StageRecord(kind="pretrain", status="succeeded", hash="0" * 64, output_uri="file:///x/stages/pretrain-1",
                          attempts=1, started_at=1.0, finished_at=2.0, metrics={"final_loss": 1.0, "tokens_per_s": 1.0})
    record = record.model_copy(update={"stages": {**record.stages, "pretrain": trained}})
    gate = GateSpec(stage="eval", model="pretrain", metrics=[GateMetric(name=f"{label}/animals_lm/acc",
                                                                        max_regression=0.05)])
    store = open_storage(f"file://{tmp_path}")
    result = apply_gate(gate, record, store, now=1.0)
    assert result.status == "promoted", result.reason
    assert json.loads(store.read_bytes(alias_key(record.pipeline, "latest")))["metrics"] == {
        f"{label}/animals_lm/acc": acc}
    better = {"run_id": "r0", "pipeline": record.pipeline, "metrics": {f"{label}/animals_lm/acc": acc + 0.1}}
    store.write_bytes(alias_key(record.pipeline, "latest"), json.dumps(better).encode())
    result = apply_gate(gate, record.model_copy(update={"run_id": "lm2"}), store, now=2.0)
    assert result.status == "regressed" and f"{label}/animals_lm/acc" in result.reason


def test_a_gate_naming_an_lm_eval_task_validates(tmp_path, monkeypatch, capsys):
    from drivers import pipeline

    with open(pipeline(tmp_path)) as f:
        raw = yaml.safe_load(f)
    monkeypatch.chdir(_workdir(tmp_path))  # the YAML's data file is relative to the current directory
    task = {"name": "animals_lm", "type": "lm_eval", "yaml": "lm_tasks/animals.yaml"}
    raw["stages"]["eval"] = {"kind": "evaluate", "models": ["pretrain"], "tasks": [task]}
    raw["gate"] = {"stage": "eval", "model": "pretrain", "metrics": [{"name": "pretrain/animals_lm/acc_norm"}]}
    path = tmp_path / "gated.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_spec(str(path)).gate.metrics[0].name == "pretrain/animals_lm/acc_norm"
    raw["gate"]["metrics"][0]["name"] = "pretrain/animals/acc"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["validate", str(path)]) == 2
    assert "gate.metrics[0].name: eval has no task 'animals'; it has ['animals_lm']" in capsys.readouterr().err


def test_without_the_extra_validate_exits_2_naming_the_install_command(tmp_path, monkeypatch, capsys):
    import jobs.harness

    monkeypatch.chdir(_workdir(tmp_path))
    spec = _pipeline(tmp_path, str(tmp_path), [
        {"name": "animals", "type": "multiple_choice", "path": "rows.jsonl"},
        {"name": "animals_lm", "type": "lm_eval", "yaml": "lm_tasks/animals.yaml"}], f"file://{tmp_path}/store")
    assert main(["validate", spec]) == 0
    real = jobs.harness.find_spec
    monkeypatch.setattr(jobs.harness, "find_spec", lambda name: None if name == "lm_eval" else real(name))
    capsys.readouterr()
    assert main(["validate", spec]) == 2
    err = capsys.readouterr().err
    assert "stages.eval.tasks[1].type: lm_eval tasks run lm-evaluation-harness, which is not installed" in err
    assert "pip install 'ray-llm-orchestrator[lm-eval]'" in err
    assert "tasks[0]" not in err  # the native task needs nothing


def test_validate_names_each_bad_lm_eval_task(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_workdir(tmp_path))
    (tmp_path / "lm_tasks" / "nodata.yaml").write_text(TASK_YAML.format(data="missing.jsonl"))
    (tmp_path / "broken.yaml").write_text("task: x\ndoc_to_text: [unclosed\n")
    (tmp_path / "group.yaml").write_text("group: animals\ntask: [animals_mc]\n")
    (tmp_path / "func.yaml").write_text("include: lm_tasks/animals.yaml\nprocess_docs: !function utils.clean\n")
    tasks = [{"name": n, "type": "lm_eval", "yaml": y} for n, y in [
        ("nodata", "lm_tasks/nodata.yaml"), ("broken", "broken.yaml"), ("group", "group.yaml"),
        ("func", "func.yaml"), ("absent", "absent.yaml")]]
    tasks += [{"name": "typo", "type": "lm_eval", "task": "hellaswg"}, {"name": "known", "type": "lm_eval",
                                                                         "task": "hellaswag"}]
    spec = _pipeline(tmp_path, str(tmp_path), tasks, f"file://{tmp_path}/store")
    capsys.readouterr()
    assert main(["validate", spec]) == 2
    problems = capsys.readouterr().err.splitlines()[1:]
    assert len(problems) == 6, problems
    assert problems[0].startswith("  - stages.eval.tasks[0].yaml: lm_tasks/nodata.yaml names data file "
                                  "'missing.jsonl' (dataset_kwargs.data_files), which does not exist")
    assert problems[1].startswith("  - stages.eval.tasks[1].yaml: broken.yaml is not valid YAML")
    assert problems[2].startswith("  - stages.eval.tasks[2].yaml: group.yaml must define one task")
    assert problems[3].startswith("  - stages.eval.tasks[3].yaml: func.yaml: `!function utils.clean` (line 2) "
                                  "is not supported")
    assert problems[4] == "  - stages.eval.tasks[4].yaml: absent.yaml does not exist or is not a file"
    assert problems[5].startswith("  - stages.eval.tasks[5].task: 'hellaswg' is not a task or group of lm-eval")
    assert "did you mean 'hellaswag'" in problems[5]


def test_task_types_are_one_clear_error(tmp_path, capsys):
    tasks = [{"name": "a", "type": "lm_evl", "task": "x"}, {"name": "b", "type": "lm_eval"},
             {"name": "c", "type": "lm_eval", "task": "x", "yaml": "y.yaml"},
             {"name": "d", "type": "lm_eval", "task": "x", "max_new_tokens": 3}]
    capsys.readouterr()
    assert main(["validate", _pipeline(tmp_path, str(tmp_path), tasks, f"file://{tmp_path}/store")]) == 2
    problems = capsys.readouterr().err.splitlines()[1:]
    assert problems == [
        "  - stages.eval.tasks[0]: give each task a `type`: multiple_choice, exact_match (native, from a JSON-lines "
        "file) or lm_eval (lm-evaluation-harness)",
        "  - stages.eval.tasks[1]: task 'b': give exactly one of `task` (a name in lm-eval's registry) and `yaml` "
        "(a local task YAML)",
        "  - stages.eval.tasks[2]: task 'c': give exactly one of `task` (a name in lm-eval's registry) and `yaml` "
        "(a local task YAML)",
        "  - stages.eval.tasks[3].max_new_tokens: unknown field; valid fields: limit, "
        "name, num_fewshot, task, type, yaml"]


def test_the_plan_fingerprints_and_submit_ships_the_yamls_data_file(tmp_path, monkeypatch):
    from orchestrator.plan import make_plan
    from orchestrator.submit import files_to_ship

    monkeypatch.chdir(_workdir(tmp_path))
    spec_path = _pipeline(tmp_path, str(tmp_path), [
        {"name": "animals_lm", "type": "lm_eval", "yaml": "lm_tasks/animals.yaml"}], f"file://{tmp_path}/store")
    spec = load_spec(spec_path)
    assert [(w, v) for w, _, _, v in local_fields(spec.stages["eval"], "eval")] == [
        ("eval.models[0].path", str(tmp_path)), ("eval.tasks[0].yaml.dataset_kwargs.data_files", "rows.jsonl"),
        ("eval.tasks[0].yaml", "lm_tasks/animals.yaml")]
    assert {"rows.jsonl", "lm_tasks/animals.yaml"} <= set(files_to_ship(spec))
    storage = open_storage(f"file://{tmp_path}/store")
    before = make_plan(spec, storage)[0].hash
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    assert make_plan(spec, storage)[0].hash != before


def test_the_registry_names_cache_is_read_back_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from jobs.harness import registry_names

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    names = registry_names()  # built from lm-eval's index, then written to the cache
    assert "hellaswag" in names["tasks"]
    [cached] = (tmp_path / "a" / "orchestrator").iterdir()
    cached.write_text(json.dumps({**names, "tasks": ["only-in-the-cache"]}))
    assert registry_names()["tasks"] == ["only-in-the-cache"]  # read back, not rebuilt

    # A cache whose file cannot be replaced (a directory holds its name): built again, and the
    # failed write leaves no temp file behind.
    blocked = tmp_path / "b" / "orchestrator" / cached.name
    (blocked / "inside").mkdir(parents=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert registry_names() == names
    assert [p.name for p in blocked.parent.iterdir()] == [cached.name]
