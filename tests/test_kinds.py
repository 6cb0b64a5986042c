"""The registry of stage kinds (orchestrator/kinds) is the one place that knows the kinds: the
control plane reads their declarations and never names a kind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing

from orchestrator.kinds import KINDS

ORCHESTRATOR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "orchestrator")


def test_no_control_plane_module_names_a_kind():
    """Outside the kinds' own modules (orchestrator/kinds, and their run functions in
    orchestrator/stages) no string names a kind: a new kind is one module plus one registration."""
    named = re.compile(r"""["'](%s)["']""" % "|".join(KINDS))
    found = []
    for entry in os.scandir(ORCHESTRATOR):
        if entry.name.endswith(".py"):
            with open(entry.path) as f:
                found += [f"{entry.name}:{i}: {line.strip()}" for i, line in enumerate(f, 1) if named.search(line)]
    assert found == []


def test_each_kind_declares_a_spec_of_its_own_name_a_run_function_and_references_to_registered_kinds():
    for name, kind in KINDS.items():
        assert kind.name == name
        assert typing.get_args(kind.spec.model_fields["kind"].annotation) == (name,)
        assert callable(kind.run_function())
        assert kind.version >= 1
        for field, targets in kind.references.items():
            assert field in kind.spec.model_fields and set(targets) <= set(KINDS), (name, field)
        assert kind.beside <= set(kind.references), name


def test_validating_and_planning_import_no_ray_torch_or_deepspeed():
    """The run functions are imported only when a stage runs: `validate` and `plan` stay fast."""
    code = ("import sys; import orchestrator.spec, orchestrator.plan, orchestrator.console, orchestrator.report; "
            "print([m for m in ('ray', 'torch', 'deepspeed', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


EXAMPLE_RESULTS = {
    "tokenizer": {"vocab_size": 4096, "eos_id": 2},
    "preprocess": {"num_records": 10, "num_documents": 9, "num_tokens": 900, "num_sequences": 3,
                   "num_tokens_dropped": 132, "num_shards": 2, "drops": {"too_short": 1}},
    "pretrain": {"final_loss": 3.5, "tokens_per_s": 1234.5, "mfu": None, "last_checkpoint": "s3://b/p/ckpt/step-00000040",
                 "resumed_from": 20, "loss_history": [[20, 4.0], [40, 3.5]], "export_max_logit_diff": 1e-6,
                 "restarts": 1, "tflops_per_device": 0.5, "peak_memory_gib": 1.5, "model_param_bytes": 1000,
                 "param_bytes_per_rank": [500, 500], "speed": {"attention": "sdpa (flash)", "compile": "layers"}},
    "finetune": {"final_loss": 2.0, "tokens_per_s": 99.0, "last_checkpoint": None, "sft_num_examples": 8,
                 "sft_num_truncated": 0, "sft_num_response_tokens": 40, "sft_num_without_response": 0},
    "evaluate": {"results": {"pretrain": {"perplexity": {"loss": 3.0, "perplexity": 20.09, "num_tokens": 5000},
                                          "tasks": {"colors": {"exact_match": 0.5, "num_examples": 8}}}}},
}


def test_typed_results_round_trip_through_the_run_record(tmp_path):
    from jobs.storage import open_storage
    from orchestrator.records import RunRecord, StageRecord, load_record, save_record

    assert set(EXAMPLE_RESULTS) == set(KINDS)
    storage = open_storage(f"file://{tmp_path}")
    typed = {name: KINDS[name].results.model_validate(raw) for name, raw in EXAMPLE_RESULTS.items()}
    record = RunRecord(run_id="r", pipeline="p", spec_hash="0" * 64, storage=storage.uri, stages={
        name: StageRecord(kind=name, hash="0" * 64, output_uri="file:///x", metrics=results.model_dump(mode="json"))
        for name, results in typed.items()})
    save_record(storage, record)
    loaded = load_record(storage, "r")
    for name, results in typed.items():
        assert KINDS[name].results_of(loaded.stages[name].metrics) == results, name
        assert KINDS[name].summarize(results)  # every kind says something about finished results
    assert KINDS["pretrain"].results_of(loaded.stages["pretrain"].metrics).resumed_from == 20
    assert KINDS["tokenizer"].results_of({"vocab": 1}) is None  # not a tokenizer's: no summary, not a crash
