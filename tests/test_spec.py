"""Unit tests of the pipeline file: parsing, every problem at once with its field path, and the CLI's
`validate` exit codes. No Ray, no storage."""

from __future__ import annotations

import os
import textwrap

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.errors import SpecError, UserError
from orchestrator.spec import PipelineSpec, _find_cycle, load_spec, parse_spec
from problems import one_problem_starting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "examples", "demo.yaml")


def _problems(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(textwrap.dedent(text))
    return info.value.problems


def _valid(**stages) -> dict:
    return {"name": "t", "stages": stages}


TOK = {"kind": "tokenizer", "source": {"paths": ["data/*.jsonl"]}, "vocab_size": 4096}
CORPUS = {"kind": "preprocess", "source": {"paths": ["data/*.jsonl"]}, "tokenizer": "tok", "seq_len": 256}


# --- the demo ------------------------------------------------------------------------------

def test_demo_spec_parses():
    spec = load_spec(DEMO)
    assert isinstance(spec, PipelineSpec)
    assert spec.name == "demo"
    assert spec.storage == "file://./.orchestrator"
    assert set(spec.stages) == {"tok", "corpus", "pretrain", "sft_plurals", "sft_colors", "eval"}
    tok, corpus = spec.stages["tok"], spec.stages["corpus"]
    assert tok.kind == "tokenizer" and tok.vocab_size == 4096
    assert tok.source.paths == ["examples/data/*.jsonl"] and tok.source.format == "jsonl"
    assert corpus.kind == "preprocess" and corpus.tokenizer == "tok" and corpus.seq_len == 256
    assert corpus.filters.min_chars == 50 and corpus.filters.min_words == 10
    assert corpus.filters.min_alpha_fraction == 0.6
    assert corpus.validation_fraction == 0.02 and corpus.shard_mb == 0.5
    # The DAG comes from the references: the tokenizer before the corpus that uses it.
    assert spec.upstream("corpus") == {"tokenizer": "tok"}
    assert spec.upstream("tok") == {}
    assert spec.topological_order()[:2] == ["tok", "corpus"] and spec.topological_order()[-1] == "eval"


def test_spec_hash_ignores_storage_and_key_order():
    a = parse_spec(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS)))
    b = parse_spec(yaml.safe_dump({"stages": {"corpus": CORPUS, "tok": TOK}, "name": "t",
                                   "storage": "s3://bucket/prefix"}))
    assert a.spec_hash() == b.spec_hash()
    c = parse_spec(yaml.safe_dump(_valid(tok={**TOK, "vocab_size": 8192}, corpus=CORPUS)))
    assert c.spec_hash() != a.spec_hash()


# --- every problem at once -----------------------------------------------------------------

MANY_MISTAKES = """
    name: Bad_Name
    storage: gs://bucket/x
    nme: oops
    stages:
      tok:
        kind: tokenizer
        source: {paths: ["data/*.jsonl"], text_feild: body}
        vocab_sise: 5000
        min_frequency: lots
      big:
        kind: tokenizer
        source: {paths: ["data/*.jsonl"]}
        vocab_size: 10
      corpus:
        kind: preprocess
        source: {paths: ["data/*.jsonl"]}
        tokenizer: tok
        seq_len: 4
        filters: {min_char: 3}
      wrongkind:
        kind: preprocess
        source: {paths: ["data/*.jsonl"]}
        tokenizer: corpus
      dangling:
        kind: preprocess
        source: {paths: ["data/*.jsonl"]}
        tokenizer: nosuchstage
      train:
        kind: pretrian
      "Bad Stage":
        kind: tokenizer
        path: some/dir
"""


def test_many_mistakes_are_all_reported_at_once_with_field_paths():
    problems = _problems(MANY_MISTAKES)

    # unknown keys, with a did-you-mean and the valid fields (top level, stage level, nested)
    top = one_problem_starting(problems, "nme")
    assert "unknown field" in top and "did you mean 'name'?" in top
    assert "gate, lease_timeout_s, name, schedule, stages, storage" in top
    stage_key = one_problem_starting(problems, "stages.tok.vocab_sise")
    assert "did you mean 'vocab_size'?" in stage_key and "min_frequency" in stage_key
    nested = one_problem_starting(problems, "stages.tok.source.text_feild")
    assert "did you mean 'text_field'?" in nested and "format, paths, text_field" in nested
    deeper = one_problem_starting(problems, "stages.corpus.filters.min_char")
    assert "did you mean 'min_chars'?" in deeper

    # wrong type
    wrong_type = one_problem_starting(problems, "stages.tok.min_frequency")
    assert "valid integer" in wrong_type and "'lots'" in wrong_type

    # out-of-range values
    vocab = one_problem_starting(problems, "stages.big.vocab_size")
    assert "greater than or equal to 258" in vocab and "(got 10)" in vocab
    seq = one_problem_starting(problems, "stages.corpus.seq_len")
    assert "greater than or equal to 8" in seq and "(got 4)" in seq

    # unknown stage kind, with the choices
    kind = one_problem_starting(problems, "stages.train.kind")
    assert "'pretrian' is not a stage kind" in kind and "tokenizer, preprocess" in kind

    # references: to a missing stage, and to a stage of the wrong kind
    missing = one_problem_starting(problems, "stages.dangling.tokenizer")
    assert "'nosuchstage' is not a stage" in missing and "tok" in missing
    wrong = one_problem_starting(problems, "stages.wrongkind.tokenizer")
    assert "'corpus' is a preprocess stage" in wrong and "tokenizer stage" in wrong

    # pipeline name, storage scheme and a stage name
    name = one_problem_starting(problems, "name")
    assert "lowercase" in name and "'Bad_Name'" in name
    storage = one_problem_starting(problems, "storage")
    assert "file://" in storage and "s3://" in storage and "'gs://bucket/x'" in storage
    stage_name = one_problem_starting(problems, "stages.Bad Stage")
    assert "invalid stage name" in stage_name

    assert len(problems) == 13, problems


def test_spec_error_message_lists_every_problem_and_is_a_user_error():
    with pytest.raises(SpecError) as info:
        parse_spec(textwrap.dedent(MANY_MISTAKES), "pipe.yaml")
    err = info.value
    assert isinstance(err, UserError)
    assert err.source == "pipe.yaml"
    text = str(err)
    assert text.startswith(f"pipe.yaml: {len(err.problems)} problems\n")
    for problem in err.problems:
        assert f"  - {problem}" in text


@pytest.mark.parametrize("stage, fragment", [
    ({"kind": "tokenizer", "source": {"paths": ["a.jsonl"]}, "path": "tok/dir"}, "exactly one of `source`"),
    ({"kind": "tokenizer"}, "exactly one of `source`"),
])
def test_tokenizer_stage_needs_exactly_one_of_source_and_path(stage, fragment):
    problems = _problems(yaml.safe_dump(_valid(tok=stage)))
    assert len(problems) == 1
    assert problems[0].startswith("stages.tok: ") and fragment in problems[0]


def test_tokenizer_stage_with_only_a_path_is_valid():
    spec = parse_spec(yaml.safe_dump(_valid(tok={"kind": "tokenizer", "path": "tok/dir"})))
    assert spec.stages["tok"].path == "tok/dir" and spec.stages["tok"].source is None


def test_missing_required_field_and_missing_kind():
    problems = _problems(yaml.safe_dump(_valid(
        corpus={"kind": "preprocess", "source": {"paths": ["a.jsonl"]}},
        nokind={"source": {"paths": ["a.jsonl"]}})))
    assert "required field missing" in one_problem_starting(problems, "stages.corpus.tokenizer")
    assert "missing `kind`" in one_problem_starting(problems, "stages.nokind")


@pytest.mark.parametrize("name", ["demo", "nightly-llm", "a1-b2-c3"])
def test_good_pipeline_names(name):
    assert parse_spec(yaml.safe_dump({"name": name, "stages": {"tok": TOK}})).name == name


@pytest.mark.parametrize("name", ["Demo", "my_pipe", "-lead", "trail-", "dou--ble", "with space", ""])
def test_bad_pipeline_names(name):
    problems = _problems(yaml.safe_dump({"name": name, "stages": {"tok": TOK}}))
    assert len(problems) == 1 and problems[0].startswith("name: ")


@pytest.mark.parametrize("storage, ok", [
    ("file://./x", True), ("file:///abs/x", True), ("s3://bucket/prefix", True), ("s3://bucket", True),
    ("gs://bucket", False), ("/abs/path", False), ("bucket/prefix", False), ("S3://bucket", False),
])
def test_storage_scheme(storage, ok):
    text = yaml.safe_dump({"name": "t", "storage": storage, "stages": {"tok": TOK}})
    if ok:
        assert parse_spec(text).storage == storage
    else:
        problems = _problems(text)
        assert len(problems) == 1 and problems[0].startswith("storage: ")


def test_source_format_and_empty_path_are_checked():
    problems = _problems(yaml.safe_dump(_valid(tok={
        "kind": "tokenizer", "source": {"paths": ["a.jsonl", "  "], "format": "csv"}})))
    fmt = one_problem_starting(problems, "stages.tok.source.format")
    assert "'csv'" in fmt and "jsonl" in fmt
    assert "empty path" in one_problem_starting(problems, "stages.tok.source.paths")


def test_not_a_mapping_and_bad_yaml():
    assert "must be a mapping" in _problems("- a\n- b\n")[0]
    assert "not valid YAML" in _problems("name: [unclosed\n")[0]
    assert "required field missing" in one_problem_starting(_problems("name: t\n"), "stages")


def test_load_spec_of_a_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(str(tmp_path / "nope.yaml"))
    assert "cannot read the pipeline file" in str(info.value)


# --- cycles --------------------------------------------------------------------------------
# With today's kinds only `preprocess.tokenizer` references another stage (a tokenizer, which
# references nothing), so a cycle cannot be written in a pipeline file; the detector itself is
# tested directly, and a self-reference is caught as a wrong-kind reference.

def test_find_cycle_two_stages():
    assert _find_cycle({"a": ["b"], "b": ["a"]}) == ["a", "b", "a"]


def test_find_cycle_self_loop_and_longer_cycle_behind_a_tail():
    assert _find_cycle({"a": ["a"]}) == ["a", "a"]
    assert _find_cycle({"x": ["a"], "a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]


def test_find_cycle_none_in_a_dag():
    assert _find_cycle({}) is None
    assert _find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None
    # a diamond: c is reached twice, but that is not a cycle
    assert _find_cycle({"a": ["b", "c"], "b": ["d"], "c": ["d"]}) is None


def test_self_reference_is_rejected():
    problems = _problems(yaml.safe_dump(_valid(
        corpus={**CORPUS, "tokenizer": "corpus"})))
    assert "'corpus' is a preprocess stage" in one_problem_starting(problems, "stages.corpus.tokenizer")


# --- the `tokenizer: {path: DIR}` union -----------------------------------------------------

def test_tokenizer_reference_as_local_path():
    spec = parse_spec(yaml.safe_dump(_valid(corpus={**CORPUS, "tokenizer": {"path": "tok/dir"}})))
    assert spec.stages["corpus"].tokenizer.path == "tok/dir"
    assert spec.upstream("corpus") == {}
    assert spec.topological_order() == ["corpus"]


def test_unknown_key_in_tokenizer_local_path_names_a_clean_path():
    problems = _problems(yaml.safe_dump(_valid(corpus={**CORPUS, "tokenizer": {"path": "d", "pth": 1}})))
    assert problems == [
        "stages.corpus.tokenizer.pth: unknown field; did you mean 'path'? valid fields: path"]


def test_wrong_type_of_tokenizer_reference_is_one_problem_at_its_path():
    problems = _problems(yaml.safe_dump(_valid(corpus={**CORPUS, "tokenizer": 5})))
    assert len(problems) == 1 and problems[0].startswith("stages.corpus.tokenizer: ")


def test_unknown_key_without_a_close_match_reads_well():
    problems = _problems(yaml.safe_dump({"name": "t", "zzzzzz": 1, "stages": {"tok": TOK}}))
    assert problems == ["zzzzzz: unknown field; valid fields: gate, lease_timeout_s, name, schedule, stages, storage, "
                        "tracking"]


@pytest.mark.parametrize("text, path", [
    ("name: t\nstages:\n  tok: {kind: tokenizer, path: x, vocab_size: 300, vocab_size: 5000}\n",
     "stages.tok.vocab_size"),
    ("name: t\nstages:\n  tok: {kind: tokenizer, path: x}\n  tok: {kind: tokenizer, path: y}\n", "stages.tok"),
])
def test_duplicate_keys_are_reported(text, path):
    problems = _problems(text)
    assert any(p.startswith(path + ": ") and "duplicate" in p for p in problems), problems


# --- the CLI -------------------------------------------------------------------------------

def test_cli_validate_demo_exits_0(capsys):
    assert main(["validate", DEMO]) == 0
    out = capsys.readouterr()
    assert "valid pipeline 'demo'" in out.out and "tok, corpus" in out.out
    assert out.err == ""


def test_cli_validate_invalid_file_exits_2_and_prints_every_problem(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(MANY_MISTAKES))
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith(f"error: {path}: 13 problems")
    for fragment in ["stages.tok.vocab_sise", "stages.train.kind", "stages.dangling.tokenizer",
                     "stages.wrongkind.tokenizer", "storage: ", "name: ", "stages.big.vocab_size"]:
        assert fragment in out.err
    assert "Traceback" not in out.err


def test_cli_validate_missing_file_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read the pipeline file" in capsys.readouterr().err


# --- the pretrain stage ---------------------------------------------------------------------

TRAIN = {"kind": "pretrain", "data": "corpus", "model": {"preset": "tiny"}, "steps": 20, "micro_batch": 4,
         "num_workers": 2}


def test_pretrain_stage_on_a_preprocess_stage_validates():
    spec = parse_spec(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS, train=TRAIN)))
    train = spec.stages["train"]
    assert train.kind == "pretrain" and train.data == "corpus"
    assert (train.steps, train.micro_batch, train.num_workers, train.grad_accum) == (20, 4, 2, 1)
    assert train.zero_stage == 2 and train.model.dims()["hidden_size"] == 64
    assert spec.upstream("train") == {"data": "corpus"}
    assert spec.topological_order() == ["tok", "corpus", "train"]


def test_pretrain_zero_stage_must_be_1_2_or_3():
    problems = _problems(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS, train={**TRAIN, "zero_stage": 4})))
    assert len(problems) == 1, problems
    zero = one_problem_starting(problems, "stages.train.zero_stage")
    assert "1, 2 or 3" in zero and "(got 4)" in zero


def test_pretrain_global_batch_must_divide_by_micro_batch_times_workers():
    problems = _problems(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS, train={**TRAIN, "global_batch": 12})))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.train")
    assert "global_batch 12 does not divide by micro_batch 4 x num_workers 2 = 8" in message
    assert "use a multiple of 8" in message


def test_pretrain_global_batch_sets_grad_accum():
    spec = parse_spec(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS, train={**TRAIN, "global_batch": 32})))
    assert spec.stages["train"].grad_accum == 4
    # giving both is fine when they agree
    spec = parse_spec(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS,
                                            train={**TRAIN, "global_batch": 32, "grad_accum": 4})))
    assert spec.stages["train"].grad_accum == 4


def test_pretrain_grad_accum_contradicting_global_batch_is_an_error():
    problems = _problems(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS,
                                               train={**TRAIN, "global_batch": 32, "grad_accum": 3})))
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.train")
    assert "grad_accum 3 contradicts global_batch 32" in message and "(= 4 x 8)" in message


def test_preprocess_seq_len_longer_than_the_models_positions_is_reported_at_validate(tmp_path, capsys):
    text = yaml.safe_dump(_valid(tok=TOK, corpus={**CORPUS, "seq_len": 4096},
                                 train={**TRAIN, "model": {"preset": "tiny", "max_position_embeddings": 2048}}))
    problems = _problems(text)
    assert len(problems) == 1, problems
    message = one_problem_starting(problems, "stages.train.model.max_position_embeddings")
    assert "2048" in message and "stages.corpus.seq_len 4096" in message
    path = tmp_path / "long.yaml"
    path.write_text(text)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "stages.train.model.max_position_embeddings" in err and "stages.corpus.seq_len" in err
    # equal is fine
    parse_spec(yaml.safe_dump(_valid(tok=TOK, corpus={**CORPUS, "seq_len": 2048}, train=TRAIN)))


def test_seq_len_longer_than_the_models_positions_is_reported_with_other_mistakes():
    problems = _problems(yaml.safe_dump(_valid(tok={**TOK, "vocab_size": 10}, corpus={**CORPUS, "seq_len": 4096},
                                               train=TRAIN)))
    one_problem_starting(problems, "stages.tok.vocab_size")
    one_problem_starting(problems, "stages.train.model.max_position_embeddings")


def test_pretrain_custom_resources_go_into_every_workers_bundle():
    spec = parse_spec(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS, train={**TRAIN, "resources_per_worker": {"H100": 1}})))
    assert spec.stages["train"].bundles() == [{"CPU": 1.0, "H100": 1.0}] * 2


@pytest.mark.parametrize("resources, fragment", [({"GPU": 1}, "use cpus_per_worker / use_gpu"),
                                                 ({"H100": 0}, "H100: 0.0 must be > 0")])
def test_pretrain_resources_per_worker_mistakes(resources, fragment):
    problems = _problems(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS, train={**TRAIN, "resources_per_worker": resources})))
    assert len(problems) == 1, problems
    assert fragment in one_problem_starting(problems, "stages.train.resources_per_worker")


def test_pretrain_data_naming_a_tokenizer_stage_is_an_error():
    problems = _problems(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS, train={**TRAIN, "data": "tok"})))
    message = one_problem_starting(problems, "stages.train.data")
    assert "'tok' is a tokenizer stage" in message and "preprocess stage" in message


def test_pretrain_data_naming_a_missing_stage_is_an_error():
    problems = _problems(yaml.safe_dump(_valid(tok=TOK, corpus=CORPUS, train={**TRAIN, "data": "corpsu"})))
    assert "'corpsu' is not a stage" in one_problem_starting(problems, "stages.train.data")


def test_pretrain_hash_ignores_max_failures_but_not_steps(tmp_path):
    from jobs.storage import open_storage
    from orchestrator.plan import make_plan

    source = tmp_path / "data" / "part-0.jsonl"
    source.parent.mkdir()
    source.write_text("".join(f'{{"text": "document {i} has a few words"}}\n' for i in range(5)))
    storage = open_storage("file://" + str(tmp_path / "store"))

    def hashes(corpus_fields: dict | None = None, **train_fields) -> dict[str, str]:
        src = {"paths": [str(source)], "format": "jsonl", "text_field": "text"}
        raw = _valid(tok={**TOK, "source": src}, corpus={**CORPUS, "source": src, **(corpus_fields or {})},
                     train={**TRAIN, **train_fields})
        return {p.name: p.hash for p in make_plan(parse_spec(yaml.safe_dump(raw)), storage)}

    base = hashes(max_failures=2)
    assert hashes(max_failures=7)["train"] == base["train"]
    # where the workers run is not what they compute
    assert hashes(max_failures=2, resources_per_worker={"H100": 1})["train"] == base["train"]
    more_steps = hashes(max_failures=2, steps=21)
    assert more_steps["train"] != base["train"]
    assert more_steps["tok"] == base["tok"] and more_steps["corpus"] == base["corpus"]
    # an upstream change reaches the training stage through the data reference
    shorter = hashes({"seq_len": 128}, max_failures=2)
    assert shorter["corpus"] != base["corpus"] and shorter["train"] != base["train"]
