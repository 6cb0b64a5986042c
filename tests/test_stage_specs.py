"""Unit tests of the finetune and evaluate stage kinds at validate time: references, checkpoint
steps, context lengths, task files (every problem at once, with file:line), the CLI's exit code,
retention agreeing with the checkpoint writer's, and plan hashes covering task files.
No Ray, no network, no training; local files and storage under tmp_path."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from jobs.train_spec import TrainSpec
from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.spec import LocalPath, ModelRef, PipelineSpec, checkpoint_steps, load_spec, parse_spec
from problems import one_problem_starting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "examples", "demo.yaml")


def _problems(raw: dict) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(yaml.safe_dump(raw))
    return info.value.problems


def _valid(**stages) -> dict:
    return {"name": "t", "stages": stages}


def _write_jsonl(path, rows: list) -> str:
    """Rows as JSON lines; a str row is written verbatim (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


SFT_ROWS = [{"prompt": "One cat, two", "response": " cats"}, {"prompt": "One dog, two", "response": " dogs"}]
MC_ROWS = [{"context": "One cat, two", "choices": [" cats", " cat", " cated"], "answer": 0},
           {"context": "One dog, two", "choices": [" dogs", " dog"], "answer": 1}]
EM_ROWS = [{"prompt": "The ball is red. The ball is", "answer": "red"}]

TOK = {"kind": "tokenizer", "source": {"paths": ["data/*.jsonl"]}, "vocab_size": 4096}
CORPUS = {"kind": "preprocess", "source": {"paths": ["data/*.jsonl"]}, "tokenizer": "tok", "seq_len": 256}
# checkpoints at 40, 80 and 100 (the last step); keep_last 1 keeps only 100
PRETRAIN = {"kind": "pretrain", "data": "corpus", "model": {"preset": "tiny", "max_position_embeddings": 256},
            "steps": 100, "checkpoint_every": 40, "keep_last": 1, "micro_batch": 4, "num_workers": 1}


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """Valid task files: sft (prompt/response), mc (multiple choice), em (exact match)."""
    return {"sft": _write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS),
            "mc": _write_jsonl(tmp_path / "mc.jsonl", MC_ROWS),
            "em": _write_jsonl(tmp_path / "em.jsonl", EM_ROWS)}


def _ft(files, **fields) -> dict:
    return {"kind": "finetune", "init": "pretrain", "task": {"path": files["sft"], "seq_len": 32}, "steps": 10,
            "num_workers": 1, **fields}


def _eval(files, **fields) -> dict:
    return {"kind": "evaluate", "models": ["pretrain"],
            "tasks": [{"name": "mc", "type": "multiple_choice", "path": files["mc"]}], **fields}


def _pipeline(files, **stages) -> dict:
    """tok -> corpus -> pretrain, plus `stages` (a value of None removes a stage)."""
    base = {"tok": TOK, "corpus": CORPUS, "pretrain": PRETRAIN}
    merged = {**base, **stages}
    return _valid(**{k: v for k, v in merged.items() if v is not None})


# --- the demo ---------------------------------------------------------------------------------

def test_demo_parses_and_eval_depends_on_every_model_and_the_corpus(monkeypatch):
    monkeypatch.chdir(REPO)  # the demo's task files are relative to the checkout
    spec = load_spec(DEMO)
    assert isinstance(spec, PipelineSpec)
    assert set(spec.stages) == {"tok", "corpus", "pretrain", "sft_plurals", "sft_colors", "eval"}
    assert {s.kind for s in spec.stages.values()} == {"tokenizer", "preprocess", "pretrain", "finetune", "evaluate"}
    assert spec.upstream("eval") == {"models[0]": "pretrain", "models[1]": "sft_plurals",
                                     "models[2]": "sft_colors", "data": "corpus"}
    assert spec.upstream("sft_plurals") == {"init": "pretrain"}
    order = spec.topological_order()
    assert order[-1] == "eval"
    assert order.index("pretrain") < order.index("sft_plurals") and order.index("pretrain") < order.index("sft_colors")
    assert order.index("tok") < order.index("corpus") < order.index("pretrain")


def test_cli_validate_demo_exits_0(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["validate", DEMO]) == 0
    out = capsys.readouterr()
    assert "valid pipeline 'demo'" in out.out and out.out.rstrip().endswith("eval")


# --- finetune -------------------------------------------------------------------------------

def test_finetune_on_a_pretrain_stage_validates(files):
    spec = parse_spec(yaml.safe_dump(_pipeline(files, ft=_ft(files))))
    ft = spec.stages["ft"]
    assert ft.kind == "finetune" and ft.init == "pretrain" and ft.task.seq_len == 32 and ft.data is None
    assert spec.upstream("ft") == {"init": "pretrain"}
    assert spec.topological_order() == ["tok", "corpus", "pretrain", "ft"]


def test_finetune_continued_pretraining_on_data_validates(files):
    spec = parse_spec(yaml.safe_dump(_pipeline(files, ft=_ft(files, task=None, data="corpus"))))
    assert spec.upstream("ft") == {"init": "pretrain", "data": "corpus"}


def test_finetune_init_naming_an_unknown_stage(files):
    problems = _problems(_pipeline(files, ft=_ft(files, init="pretrian")))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.ft.init")
    assert "'pretrian' is not a stage" in message
    listed = message.split("stages are: ", 1)[1]
    assert sorted(listed.split(", ")) == ["corpus", "ft", "pretrain", "tok"]


def test_finetune_init_naming_a_preprocess_stage(files):
    problems = _problems(_pipeline(files, ft=_ft(files, init="corpus")))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.ft.init")
    assert "'corpus' is a preprocess stage" in message and "must name a pretrain or finetune stage" in message


@pytest.mark.parametrize("both", [True, False])
def test_finetune_needs_exactly_one_of_task_and_data(files, both):
    ft = _ft(files, data="corpus") if both else {k: v for k, v in _ft(files).items() if k != "task"}
    problems = _problems(_pipeline(files, ft=ft))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.ft")
    assert "exactly one of `task`" in message and "`data`" in message


def test_finetune_with_a_model_is_an_error(files):
    problems = _problems(_pipeline(files, ft=_ft(files, model={"preset": "tiny"})))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.ft")
    assert "`model`" in message and "come from `init`" in message


def test_finetune_init_step_with_a_local_path_is_an_error(files, tmp_path):
    problems = _problems(_pipeline(files, ft=_ft(files, init={"path": str(tmp_path)}, init_step=100)))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.ft")
    assert "`init_step`" in message and "{path: DIR}" in message


def test_finetune_from_a_local_path_validates(files, tmp_path):
    spec = parse_spec(yaml.safe_dump(_pipeline(files, ft=_ft(files, init={"path": str(tmp_path)}))))
    assert spec.stages["ft"].init == LocalPath(path=str(tmp_path))
    assert spec.upstream("ft") == {}


def test_finetune_init_step_not_kept_names_the_kept_steps(files):
    problems = _problems(_pipeline(files, ft=_ft(files, init_step=80)))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.ft.init_step")
    assert "pretrain keeps no checkpoint at step 80" in message and "[100]" in message


def test_finetune_init_step_never_committed_is_an_error(files):
    problems = _problems(_pipeline(files, ft=_ft(files, init_step=50)))
    assert "step 50" in one_problem_starting(problems, "stages.ft.init_step")


def test_finetune_init_step_kept_is_accepted(files):
    spec = parse_spec(yaml.safe_dump(_pipeline(files, ft=_ft(files, init_step=100))))
    assert spec.stages["ft"].init_step == 100
    # with a wider retention an earlier checkpoint is kept too
    spec = parse_spec(yaml.safe_dump(_pipeline(files, pretrain={**PRETRAIN, "keep_every": 40},
                                               ft=_ft(files, init_step=40))))
    assert spec.stages["ft"].init_step == 40


def test_finetune_init_step_of_a_finetune_stage_uses_its_retention(files):
    ft_b = _ft(files, init="ft", init_step=5)  # ft: steps 10, checkpoint_every 100 -> keeps [10]
    problems = _problems(_pipeline(files, ft=_ft(files), ft_b=ft_b))
    assert "ft keeps no checkpoint at step 5" in one_problem_starting(problems, "stages.ft_b.init_step")
    parse_spec(yaml.safe_dump(_pipeline(files, ft=_ft(files), ft_b=_ft(files, init="ft", init_step=10))))


def test_finetune_task_seq_len_longer_than_the_models_positions(files):
    problems = _problems(_pipeline(files, ft=_ft(files, task={"path": files["sft"], "seq_len": 512})))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.ft.task.seq_len")
    assert "512" in message and "max_position_embeddings 256" in message
    # equal is fine
    parse_spec(yaml.safe_dump(_pipeline(files, ft=_ft(files, task={"path": files["sft"], "seq_len": 256}))))


def test_finetune_of_a_finetune_inherits_the_context_length(files):
    ft_b = _ft(files, init="ft", task={"path": files["sft"], "seq_len": 300})
    problems = _problems(_pipeline(files, ft=_ft(files), ft_b=ft_b))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.ft_b.task.seq_len")
    assert "300" in message and "max_position_embeddings 256" in message


def test_finetune_data_seq_len_longer_than_the_starting_models_positions(files):
    raw = _pipeline(files, corpus={**CORPUS, "seq_len": 512}, ft=_ft(files, task=None, data="corpus"),
                    pretrain={**PRETRAIN, "model": {"preset": "tiny", "max_position_embeddings": 512}})
    parse_spec(yaml.safe_dump(raw))
    raw["stages"]["ft2"] = _ft(files, init="ft", task=None, data="corpus")
    raw["stages"]["corpus"] = {**CORPUS, "seq_len": 1024}
    problems = _problems(raw)
    one_problem_starting(problems, "stages.pretrain.model.max_position_embeddings")
    for name in ("ft", "ft2"):
        message = one_problem_starting(problems, f"stages.{name}.data")
        assert "seq_len 1024 exceeds the starting model's max_position_embeddings 512" in message


# --- evaluate -------------------------------------------------------------------------------

def test_evaluate_stage_validates_with_every_kind_of_model(files, tmp_path):
    models = ["pretrain", {"stage": "pretrain", "step": 100}, {"path": str(tmp_path)}, "ft"]
    spec = parse_spec(yaml.safe_dump(_pipeline(files, ft=_ft(files), eval=_eval(files, models=models, data="corpus"))))
    ev = spec.stages["eval"]
    assert ev.models == ["pretrain", ModelRef(stage="pretrain", step=100), LocalPath(path=str(tmp_path)), "ft"]
    # a {path: DIR} is no upstream stage; the others keep their list index
    assert spec.upstream("eval") == {"models[0]": "pretrain", "models[1]": "pretrain", "models[3]": "ft",
                                     "data": "corpus"}
    assert spec.topological_order()[-1] == "eval"


def test_evaluate_model_naming_an_unknown_stage(files):
    problems = _problems(_pipeline(files, eval=_eval(files, models=["pretrain", "nope"])))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.eval.models[1]")
    assert "'nope' is not a stage" in message and "pretrain" in message


def test_evaluate_model_ref_naming_an_unknown_or_wrong_stage(files):
    problems = _problems(_pipeline(files, eval=_eval(files, models=[{"stage": "nope", "step": 1},
                                                                    {"stage": "corpus", "step": 1}])))
    assert "'nope' is not a stage" in one_problem_starting(problems, "stages.eval.models[0]")
    wrong = one_problem_starting(problems, "stages.eval.models[1]")
    assert "'corpus' is a preprocess stage" in wrong and "pretrain or finetune" in wrong
    assert len(problems) == 2, problems


def test_evaluate_model_step_not_kept(files):
    problems = _problems(_pipeline(files, eval=_eval(files, models=["pretrain", {"stage": "pretrain", "step": 80}])))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.eval.models[1].step")
    assert "pretrain keeps no checkpoint at step 80" in message and "[100]" in message


@pytest.mark.parametrize("entry, field, fragment", [
    ({"path": "some/dir", "step": 3}, "step", "unknown field; valid fields: path"),
    ({"stage": "pretrain", "step": 100, "setp": 1}, "setp", "did you mean 'step'? valid fields: stage, step"),
    ({"stage": "pretrain", "step": 0}, "step", "greater than or equal to 1"),
    ({"stage": "pretrain"}, "step", "required field missing"),
])
def test_evaluate_mistake_in_a_model_entry_names_its_index(files, entry, field, fragment):
    """BUG: reported at `stages.eval.models.<field>` (no list index), and an unknown key lists no
    valid fields (`valid fields: ` followed by nothing)."""
    problems = _problems(_pipeline(files, eval=_eval(files, models=["pretrain", entry])))
    assert len(problems) == 1, problems
    assert fragment in one_problem_starting(problems, f"stages.eval.models[1].{field}")


def test_evaluate_model_entry_of_a_wrong_type_is_one_problem_at_its_index(files):
    """BUG: three problems naming pydantic's union members (`models[1].str`, `models[1].ModelRef`,
    `models[1].LocalPath`) instead of one saying what may be written, as `init` and `tokenizer` do."""
    problems = _problems(_pipeline(files, eval=_eval(files, models=["pretrain", 5])))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.eval.models[1]")
    assert "{path: DIR}" in message and "(got 5)" in message


def test_evaluate_unknown_key_in_a_task_lists_the_task_fields(files):
    """BUG: `stages.eval.tasks[0].limt: unknown field; valid fields: ` (no did-you-mean and an empty
    list): the field-listing helper does not look inside list[TaskSpec]."""
    tasks = [{"name": "mc", "type": "multiple_choice", "path": files["mc"], "limt": 3}]
    problems = _problems(_pipeline(files, eval=_eval(files, tasks=tasks)))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.eval.tasks[0].limt")
    assert "did you mean 'limit'?" in message
    assert "valid fields: limit, max_new_tokens, name, path, type" in message


def test_finetune_mistakes_inside_init_and_task_read_well(files):
    problems = _problems(_pipeline(files, ft=_ft(files, init={"path": "d", "pth": 1})))
    assert problems == ["stages.ft.init.pth: unknown field; did you mean 'path'? valid fields: path"]
    problems = _problems(_pipeline(files, ft=_ft(files, init=5)))
    assert problems == ["stages.ft.init: give a training stage's name or {path: DIR} (got 5)"]
    problems = _problems(_pipeline(files, ft=_ft(files, task={"path": files["sft"], "seq_lem": 32})))
    message = one_problem_starting(problems, "stages.ft.task.seq_lem")
    assert "did you mean 'seq_len'?" in message and "prompt_field, response_field, seq_len" in message


def test_evaluate_data_longer_than_a_models_positions_is_reported_at_validate(files):
    """BUG: not checked at validate; `jobs.evaluate.perplexity` raises "seq_len 512 exceeds the
    model's max_position_embeddings 256" only when the evaluate stage runs, after the training
    stages have spent their compute."""
    long_corpus = {**CORPUS, "seq_len": 512}
    raw = _pipeline(files, long=long_corpus, ft=_ft(files), eval=_eval(files, models=["pretrain", "ft"], data="long"))
    problems = _problems(raw)
    message = one_problem_starting(problems, "stages.eval.data")
    assert "512" in message and "256" in message
    # the corpus the model was trained on fits
    parse_spec(yaml.safe_dump(_pipeline(files, ft=_ft(files), eval=_eval(files, models=["pretrain", "ft"],
                                                                         data="corpus"))))


def test_evaluate_empty_models(files):
    problems = _problems(_pipeline(files, eval=_eval(files, models=[])))
    assert len(problems) == 1, problems
    assert "`models` and/or `follow`" in one_problem_starting(problems, "stages.eval")


def test_evaluate_with_nothing_to_measure(files):
    problems = _problems(_pipeline(files, eval=_eval(files, tasks=[])))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.eval")
    assert "nothing to evaluate" in message and "`data`" in message and "`tasks`" in message
    # data alone is enough
    parse_spec(yaml.safe_dump(_pipeline(files, eval=_eval(files, tasks=[], data="corpus"))))


def test_evaluate_duplicate_task_names(files):
    tasks = [{"name": "same", "type": "multiple_choice", "path": files["mc"]},
             {"name": "same", "type": "exact_match", "path": files["em"]}]
    problems = _problems(_pipeline(files, eval=_eval(files, tasks=tasks)))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.eval")
    assert "task names must differ" in message and "same" in message


def test_evaluate_max_new_tokens_only_for_exact_match(files):
    tasks = [{"name": "mc", "type": "multiple_choice", "path": files["mc"], "max_new_tokens": 4}]
    problems = _problems(_pipeline(files, eval=_eval(files, tasks=tasks)))
    assert len(problems) == 1 and problems[0].startswith("stages.eval.tasks[0]") and "max_new_tokens" in problems[0]


@pytest.mark.parametrize("stages, cycle", [
    ({"a": "b", "b": "a"}, "a -> b -> a"),
    ({"a": "a"}, "a -> a"),
    ({"a": "b", "b": "c", "c": "a"}, "a -> b -> c -> a"),
])
def test_cycle_through_finetune_init_is_one_problem(files, stages, cycle):
    raw = _pipeline(files, **{name: _ft(files, init=init) for name, init in stages.items()})
    raw["stages"]["eval"] = _eval(files, models=sorted(stages))
    problems = _problems(raw)  # no RecursionError
    assert len(problems) == 1, problems
    assert problems[0].startswith("stages: a cycle ") and cycle in problems[0]


def test_cycle_with_an_init_step_is_still_one_problem(files):
    raw = _pipeline(files, a=_ft(files, init="b", init_step=10), b=_ft(files, init="a"))
    problems = _problems(raw)
    assert len(problems) == 1 and problems[0].startswith("stages: a cycle a -> b -> a"), problems


# --- task files -----------------------------------------------------------------------------

def test_bad_multiple_choice_file_lists_every_bad_line_in_one_error(files, tmp_path):
    bad = _write_jsonl(tmp_path / "bad_mc.jsonl", [
        MC_ROWS[0],
        '{"context": "x", "choices": [" a", " b"], "answer": 0',  # 2: not JSON
        {"context": "One dog, two", "answer": 0},  # 3: no choices
        "",  # blank lines are skipped
        {"context": "One cow, two", "choices": [" cows", " cow", " cowed"], "answer": 3},  # 5: out of range
    ])
    tasks = [{"name": "mc", "type": "multiple_choice", "path": bad}]
    with pytest.raises(SpecError) as info:
        parse_spec(yaml.safe_dump(_pipeline(files, eval=_eval(files, tasks=tasks))), "pipe.yaml")
    problems = info.value.problems
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.eval.tasks[0]")
    assert "3 bad line(s)" in message and bad in message
    lines = message.splitlines()
    line2 = [ln for ln in lines if f"{bad}:2:" in ln]
    line3 = [ln for ln in lines if f"{bad}:3:" in ln]
    line5 = [ln for ln in lines if f"{bad}:5:" in ln]
    assert len(line2) == len(line3) == len(line5) == 1, lines
    assert "not valid JSON" in line2[0]
    assert 'missing field "choices"' in line3[0]
    assert '"answer" 3 is out of range' in line5[0] and "0..2" in line5[0]
    assert not any(f"{bad}:1:" in ln or f"{bad}:4:" in ln for ln in lines)
    assert "pipe.yaml: 1 problem\n" in str(info.value)


def test_task_file_problems_are_reported_with_every_other_problem(files, tmp_path):
    bad_mc = _write_jsonl(tmp_path / "bad_mc.jsonl", [{"context": "c", "choices": [" a", " b"], "answer": -1}])
    bad_sft = _write_jsonl(tmp_path / "bad_sft.jsonl", [SFT_ROWS[0], {"prompt": "p"}])
    raw = _pipeline(files, tok={**TOK, "vocab_size": 10},
                    ft=_ft(files, task={"path": bad_sft, "seq_len": 32}),
                    eval=_eval(files, tasks=[{"name": "ok", "type": "exact_match", "path": files["em"]},
                                             {"name": "mc", "type": "multiple_choice", "path": bad_mc}]))
    problems = _problems(raw)
    one_problem_starting(problems, "stages.tok.vocab_size")
    assert f"{bad_sft}:2:" in one_problem_starting(problems, "stages.ft.task")
    mc = one_problem_starting(problems, "stages.eval.tasks[1]")
    assert f"{bad_mc}:1:" in mc and '"answer" -1 is out of range' in mc and "0..1" in mc
    assert len(problems) == 3, problems


def test_sft_file_with_a_missing_response_field(files, tmp_path):
    bad = _write_jsonl(tmp_path / "bad_sft.jsonl", [SFT_ROWS[0], {"prompt": "One cow, two"}, SFT_ROWS[1],
                                                    {"prompt": "p", "response": ""}, "not json"])
    problems = _problems(_pipeline(files, ft=_ft(files, task={"path": bad, "seq_len": 32})))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.ft.task")
    assert f"{bad}:2: needs a non-empty string 'response'" in message
    assert f"{bad}:4: needs a non-empty string 'response'" in message
    assert f"{bad}:5: not a JSON object" in message
    assert f"{bad}:1:" not in message and f"{bad}:3:" not in message


def test_sft_file_with_custom_field_names(files, tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"q": "2+2=", "a": "4"}])
    task = {"path": path, "seq_len": 32, "prompt_field": "q", "response_field": "a"}
    parse_spec(yaml.safe_dump(_pipeline(files, ft=_ft(files, task=task))))
    problems = _problems(_pipeline(files, ft=_ft(files, task={"path": path, "seq_len": 32})))
    assert "needs a non-empty string 'prompt' and 'response'" in one_problem_starting(problems, "stages.ft.task")


def test_missing_task_files(files, tmp_path):
    missing_sft, missing_mc = str(tmp_path / "no_sft.jsonl"), str(tmp_path / "no_mc.jsonl")
    raw = _pipeline(files, ft=_ft(files, task={"path": missing_sft, "seq_len": 32}),
                    eval=_eval(files, tasks=[{"name": "mc", "type": "multiple_choice", "path": missing_mc}]))
    problems = _problems(raw)
    assert len(problems) == 2, problems
    sft = one_problem_starting(problems, "stages.ft.task")
    assert missing_sft in sft and "cannot read the task file" in sft
    mc = one_problem_starting(problems, "stages.eval.tasks[0]")
    assert missing_mc in mc and "does not exist" in mc


def test_empty_task_files(files, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    raw = _pipeline(files, ft=_ft(files, task={"path": str(empty), "seq_len": 32}),
                    eval=_eval(files, tasks=[{"name": "mc", "type": "multiple_choice", "path": str(empty)}]))
    problems = _problems(raw)
    assert "no examples" in one_problem_starting(problems, "stages.ft.task")
    assert "has no rows" in one_problem_starting(problems, "stages.eval.tasks[0]")


def test_cli_validate_bad_task_file_exits_2_and_prints_every_problem(files, tmp_path, capsys):
    bad = _write_jsonl(tmp_path / "bad_mc.jsonl", ['{"context": ', {"context": "c", "answer": 0},
                                                   {"context": "c", "choices": [" a", " b"], "answer": 2}])
    bad_sft = _write_jsonl(tmp_path / "bad_sft.jsonl", [{"prompt": "p"}])
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(_pipeline(
        files, ft=_ft(files, task={"path": bad_sft, "seq_len": 32}),
        eval=_eval(files, tasks=[{"name": "mc", "type": "multiple_choice", "path": bad}]))))
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith(f"error: {path}: 2 problems")
    for fragment in ["stages.eval.tasks[0]", f"{bad}:1:", f"{bad}:2:", f"{bad}:3:", "0..1",
                     "stages.ft.task", f"{bad_sft}:1:"]:
        assert fragment in out.err, fragment
    assert "Traceback" not in out.err


# --- checkpoint_steps and the checkpoint writer's retention -----------------------------------

RETENTION = [
    # steps, checkpoint_every, keep_last, keep_every -> kept
    (100, 40, 2, 0, [80, 100]),
    (100, 40, 2, 40, [40, 80, 100]),
    (100, 40, 1, 0, [100]),
    (120, 40, 2, 0, [80, 120]),  # steps divisible by every: the last step is saved once
    (120, 40, 5, 0, [40, 80, 120]),
    (100, 200, 2, 0, [100]),  # only the last step is ever saved
    (100, 100, 3, 0, [100]),
    (100, 30, 1, 50, [100]),  # no saved step besides the last is a multiple of 50
    (100, 25, 1, 50, [50, 100]),
    (100, 30, 1, 20, [60, 100]),  # keep_every need not be a multiple of checkpoint_every
    (10, 1, 3, 0, [8, 9, 10]),
    (7, 3, 2, 2, [6, 7]),
    (1, 1, 1, 0, [1]),
]


def _train_spec(steps: int, every: int, keep_last: int, keep_every: int) -> TrainSpec:
    return TrainSpec(steps=steps, checkpoint_every=every, keep_last=keep_last, keep_every=keep_every)


@pytest.mark.parametrize("steps, every, keep_last, keep_every, kept", RETENTION)
def test_checkpoint_steps(steps, every, keep_last, keep_every, kept):
    result = checkpoint_steps(_train_spec(steps, every, keep_last, keep_every))
    assert result == kept
    assert result == sorted(set(result)) and result[-1] == steps


def _saved_steps(steps: int, every: int) -> list[int]:
    """The steps jobs/train.py saves at: every `every` steps, and the last one."""
    return [done for done in range(1, steps + 1) if done % every == 0 or done == steps]


@pytest.mark.parametrize("steps, every, keep_last, keep_every, kept", RETENTION)
def test_checkpoint_steps_agree_with_apply_retention(tmp_path, steps, every, keep_last, keep_every, kept):
    """Commit each saved step to real local storage and apply the writer's retention after each
    commit, as CheckpointWriter does; what survives is what validate says a stage keeps."""
    from jobs.checkpoint import COMMIT, apply_retention, committed_steps, step_key
    from jobs.commit import bytes_entry, write_commit
    from jobs.storage import open_storage

    ckpt = open_storage("file://" + str(tmp_path / "ckpt"))
    for step in _saved_steps(steps, every):
        step_dir = ckpt.sub(step_key(step))
        body = f"weights at {step}".encode()
        step_dir.write_bytes("model.bin", body)
        assert write_commit(step_dir, COMMIT, {"model.bin": bytes_entry(body)}, {"step": step})
        apply_retention(ckpt, keep_last, keep_every)
    survivors, ignored = committed_steps(ckpt)
    assert ignored == []
    assert sorted(survivors) == checkpoint_steps(_train_spec(steps, every, keep_last, keep_every)) == kept


# --- plan hashes cover the task files -------------------------------------------------------

def _plan_raw(tmp_path, files, eval_models: list) -> dict:
    source = tmp_path / "data" / "part-0.jsonl"
    if not source.exists():
        source.parent.mkdir()
        source.write_text("".join(f'{{"text": "document {i} has a few words"}}\n' for i in range(5)))
    src = {"paths": [str(source)], "format": "jsonl", "text_field": "text"}
    return _pipeline(files, tok={**TOK, "source": src}, corpus={**CORPUS, "source": src},
                     ft=_ft(files), eval=_eval(files, models=eval_models,
                                               tasks=[{"name": "mc", "type": "multiple_choice", "path": files["mc"]},
                                                      {"name": "em", "type": "exact_match", "path": files["em"]}]))


def _hashes(raw: dict, storage) -> dict[str, str]:
    from orchestrator.plan import make_plan

    return {p.name: p.hash for p in make_plan(parse_spec(yaml.safe_dump(raw)), storage)}


def test_plan_hashes_change_with_task_file_content(tmp_path, files):
    from jobs.storage import open_storage

    storage = open_storage("file://" + str(tmp_path / "store"))
    raw = _plan_raw(tmp_path, files, ["pretrain"])
    base = _hashes(raw, storage)
    assert _hashes(raw, storage) == base  # nothing changed, nothing changes

    _write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS + [{"prompt": "One fox, two", "response": " foxes"}])
    after_sft = _hashes(raw, storage)
    assert after_sft["ft"] != base["ft"]
    assert {k: v for k, v in after_sft.items() if k != "ft"} == {k: v for k, v in base.items() if k != "ft"}

    _write_jsonl(tmp_path / "mc.jsonl", MC_ROWS[:1])
    after_mc = _hashes(raw, storage)
    assert after_mc["eval"] != after_sft["eval"]
    assert {k: v for k, v in after_mc.items() if k != "eval"} == {k: v for k, v in after_sft.items() if k != "eval"}

    _write_jsonl(tmp_path / "em.jsonl", EM_ROWS * 3)
    assert _hashes(raw, storage)["eval"] != after_mc["eval"]


def test_plan_finetune_task_change_reaches_the_evaluate_stage_that_uses_it(tmp_path, files):
    from jobs.storage import open_storage

    storage = open_storage("file://" + str(tmp_path / "store"))
    raw = _plan_raw(tmp_path, files, ["pretrain", "ft"])
    base = _hashes(raw, storage)
    _write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS[:1])
    after = _hashes(raw, storage)
    assert after["ft"] != base["ft"] and after["eval"] != base["eval"]
    assert after["pretrain"] == base["pretrain"]
