"""Unit tests of stage logs (orchestrator/stage_log.py), run reports (orchestrator/report.py) and
the `logs`, `report` and `status` commands. No Ray; local storage under tmp_path, plus one S3
round trip on the moto server."""

from __future__ import annotations

import re
import threading

import pytest

from jobs.storage import open_storage
from orchestrator.cli import main
from orchestrator.kinds.evaluate import EvaluateResults, ModelEvaluation
from orchestrator.records import RunRecord, StageRecord, save_record
from orchestrator.report import evaluation_table, stage_rows, write_report
from orchestrator.stage_log import StageLog, follow_log, log_key, read_log

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (.*)$")


@pytest.fixture
def storage(tmp_path):
    return open_storage("file://" + str(tmp_path / "store"))


def _messages(text: str) -> list[str]:
    """The lines of a log without their timestamps (every line must have one)."""
    return [LINE.fullmatch(line).group(1) for line in text.splitlines()]


def _stage(kind: str, status: str = "succeeded", **fields) -> StageRecord:
    return StageRecord(kind=kind, status=status, hash="0" * 64, output_uri=f"file:///store/stages/{kind}-00000000",
                       attempts=1, started_at=1000.0, finished_at=1012.5, **fields)


def _record(status: str = "succeeded") -> RunRecord:
    eval_results = {
        "pretrain": {"perplexity": {"perplexity": 41.25, "loss": 3.72, "num_tokens": 5000},
                     "tasks": {"arith": {"exact_match": 0.125, "num_examples": 8},
                               "choice": {"acc": 0.5, "acc_norm": 0.625, "num_examples": 8}}},
        "sft": {"perplexity": {"perplexity": 37.75, "loss": 3.63, "num_tokens": 5000},
                "tasks": {"arith": {"exact_match": 0.375, "num_examples": 8},
                          "choice": {"acc": 0.75, "acc_norm": 0.875, "num_examples": 8}}},
    }
    return RunRecord(
        run_id="r1", pipeline="demo", spec_hash="f" * 64, storage="file:///store", status=status,
        attempts=2, started_at=1000.0, finished_at=None if status == "running" else 1100.0,
        stages={
            "tok": _stage("tokenizer", cached=True, metrics={"vocab_size": 512, "eos_id": 2}),
            "pretrain": _stage("pretrain", metrics={
                "final_loss": 3.5, "tokens_per_s": 1234.0, "resumed_from": 20, "last_checkpoint": None,
                "loss_history": [[s, 8.0 - s / 10] for s in range(10, 50, 10)]}),
            "sft": _stage("finetune", metrics={"final_loss": 2.25, "tokens_per_s": 999.0, "last_checkpoint": None,
                                               "loss_history": [[1, 3.0], [2, 2.5], [3, 2.25]]}),
            "eval": _stage("evaluate", metrics={"results": eval_results}),
        })


# --- StageLog -------------------------------------------------------------------------------

def test_stage_log_appends_across_attempts_and_each_flush_is_complete(storage):
    first = StageLog(storage, "r1", "pretrain", flush_interval_s=3600)
    first.write("start (attempt 1)")
    first.write("step 10 loss 3.2")
    first.flush()
    assert _messages(storage.read_bytes(log_key("r1", "pretrain")).decode()) == ["start (attempt 1)", "step 10 loss 3.2"]
    first.write("Traceback (most recent call last):\n  File x\nRuntimeError: boom\n")
    first.close()
    after_first = storage.read_bytes(log_key("r1", "pretrain")).decode()
    assert _messages(after_first)[2:] == ["Traceback (most recent call last):", "  File x", "RuntimeError: boom"]

    with StageLog(storage, "r1", "pretrain", flush_interval_s=3600) as second:  # a resumed run
        second.write("start (attempt 2)")
        second.flush()
        flushed = storage.read_bytes(log_key("r1", "pretrain")).decode()
        assert flushed.startswith(after_first) and _messages(flushed)[-1] == "start (attempt 2)"
        second.write("done")
    assert _messages(read_log(storage, "r1", "pretrain"))[-2:] == ["start (attempt 2)", "done"]
    with pytest.raises(ValueError, match="closed"):
        second.write("too late")


def test_stage_log_timestamps_in_utc_from_the_clock(storage):
    with StageLog(storage, "r1", "tok", clock=lambda: 86400.25) as stage_log:
        stage_log.write("hello")
    assert read_log(storage, "r1", "tok") == "1970-01-02T00:00:00.250Z hello\n"


def test_stage_log_background_thread_flushes_without_being_asked(storage):
    stage_log = StageLog(storage, "r1", "tok", flush_interval_s=0.01)
    stage_log.write("in the background")
    for _ in range(500):  # polls until the flusher ran; no assertion on how long it took
        if storage.exists(log_key("r1", "tok")):
            break
        threading.Event().wait(0.01)
    assert _messages(read_log(storage, "r1", "tok")) == ["in the background"]
    stage_log.close()


def test_stage_log_from_many_threads_loses_no_line(storage):
    num_threads, num_lines = 8, 200
    stage_log = StageLog(storage, "r1", "pretrain", flush_interval_s=0.001)

    def writer(t):
        for i in range(num_lines):
            stage_log.write(f"thread {t} line {i}")
            if i % 50 == 0:
                stage_log.flush()  # racing with the background flusher and the other writers

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stage_log.close()
    messages = _messages(read_log(storage, "r1", "pretrain"))
    assert sorted(messages) == sorted(f"thread {t} line {i}" for t in range(num_threads) for i in range(num_lines))
    for t in range(num_threads):  # each thread's lines in the order it wrote them
        assert [m for m in messages if m.startswith(f"thread {t} ")] == [f"thread {t} line {i}" for i in range(num_lines)]


def test_stage_log_failing_last_flush_does_not_hide_the_stages_error(storage, monkeypatch):
    def unavailable(key, data):
        raise OSError("storage unavailable")

    with pytest.raises(RuntimeError, match="the stage failed"):
        with StageLog(storage, "r1", "tok", flush_interval_s=3600) as stage_log:
            stage_log.write("Traceback ...")
            monkeypatch.setattr(storage, "write_bytes", unavailable)
            raise RuntimeError("the stage failed")
    stage_log = StageLog(storage, "r1", "tok", flush_interval_s=3600)
    stage_log.write("no error in the stage")
    with pytest.raises(OSError, match="storage unavailable"):  # then the flush failure is the error
        stage_log.close()


@pytest.mark.local
def test_stage_log_round_trip_on_s3(s3_bucket):
    store = open_storage(s3_bucket + "/pipelines")
    with StageLog(store, "r1", "pretrain") as stage_log:
        stage_log.write("attempt 1")
    with StageLog(store, "r1", "pretrain") as stage_log:
        stage_log.write("attempt 2")
    assert _messages(read_log(store, "r1", "pretrain")) == ["attempt 1", "attempt 2"]
    assert _messages(store.read_bytes("runs/r1/logs/pretrain.log").decode()) == ["attempt 1", "attempt 2"]


def test_read_log_of_every_stage_in_stage_order(storage):
    record = _record()
    save_record(storage, record)
    for name in ("sft", "pretrain", "removed-stage"):
        with StageLog(storage, "r1", name) as stage_log:
            stage_log.write(f"{name} says hi")
    text = read_log(storage, "r1")
    headers = [line for line in text.splitlines() if line.startswith("==>")]
    assert headers == ["==> pretrain <==", "==> sft <==", "==> removed-stage <=="]  # tok and eval: no log
    assert text.startswith("==> pretrain <==\n") and "\n\n==> sft <==\n" in text
    assert read_log(storage, "r1", "tok") == ""


def test_follow_log_prints_growth_until_the_run_ends(storage):
    record = _record(status="running")
    save_record(storage, record)
    pretrain = StageLog(storage, "r1", "pretrain", flush_interval_s=3600)
    pretrain.write("step 10")
    pretrain.flush()
    polls = []

    def sleep(seconds):  # each poll, the "run" moves on
        polls.append(seconds)
        if len(polls) == 1:
            pretrain.write("step 20")
            pretrain.flush()
        elif len(polls) == 2:
            pretrain.close()
            with StageLog(storage, "r1", "sft") as sft:
                sft.write("sft start")
        else:
            with StageLog(storage, "r1", "sft") as sft:
                sft.write("sft done")
            record.status = "succeeded"
            save_record(storage, record)

    chunks = list(follow_log(storage, "r1", poll_s=0.5, sleep=sleep))
    assert polls == [0.5, 0.5, 0.5]
    text = "".join(chunks)
    assert [line if line.startswith("==>") else LINE.fullmatch(line).group(1) for line in text.splitlines() if line] \
        == ["==> pretrain <==", "step 10", "step 20", "==> sft <==", "sft start", "sft done"]
    assert text == read_log(storage, "r1")  # following printed exactly what reading it whole prints


# --- report ---------------------------------------------------------------------------------

def test_evaluation_table_rows_are_models_and_columns_main_metrics():
    rows = evaluation_table(EvaluateResults.model_validate(_record().stages["eval"].metrics).results)
    assert rows == [["model", "perplexity", "arith (exact_match)", "choice (acc)"],
                    ["pretrain", "41.25", "0.125", "0.500"],
                    ["sft", "37.75", "0.375", "0.750"]]
    no_perplexity = evaluation_table({"m": ModelEvaluation(tasks={"t": {"acc_norm": 0.5}}), "n": ModelEvaluation()})
    assert no_perplexity == [["model", "t (acc_norm)"], ["m", "0.500"], ["n", "-"]]


def test_write_report_writes_markdown_and_valid_pngs(storage):
    record = _record()
    record.stages["sft"].error = "RuntimeError: a | b\nsecond line"
    url = write_report(storage, record)
    assert url == storage.url("runs/r1/report.md")
    report = storage.read_bytes("runs/r1/report.md").decode()
    assert report.startswith("# Run r1\n") and "**succeeded**" in report
    for value in ("41.25", "37.75", "0.125", "0.375", "0.500", "0.750", "arith (exact_match)", "choice (acc)"):
        assert value in report
    assert "| pretrain | 41.25 | 0.125 | 0.500 |" in report
    assert "| pretrain | pretrain | succeeded | no | 1 | 12.5s | loss 3.500, 1,234 tokens/s, resumed from step 20 |" in report
    assert "| tok | tokenizer | succeeded | yes | 1 | - | vocab 512 |" in report
    assert "RuntimeError: a \\| b second line" in report  # one line, no stray column
    for name in ("loss-pretrain.png", "loss-sft.png", "loss.png"):
        assert f"]({name})" in report
        png = storage.read_bytes(f"runs/r1/{name}")
        assert png[:8] == PNG_SIGNATURE and len(png) > 5000
    assert "`file:///store/stages/pretrain-00000000/hf/`" in report
    assert "`file:///store/stages/finetune-00000000/hf/`" in report
    assert not storage.exists("runs/r1/loss-eval.png") and not storage.exists("runs/r1/loss-tok.png")


def test_report_of_one_training_stage_has_no_combined_curve(storage):
    record = _record()
    del record.stages["sft"], record.stages["eval"]
    write_report(storage, record)
    assert storage.exists("runs/r1/loss-pretrain.png") and not storage.exists("runs/r1/loss.png")
    assert "## Evaluation" not in storage.read_bytes("runs/r1/report.md").decode()


def test_stage_rows_time_a_running_stage_up_to_now():
    record = _record(status="running")
    record.stages["sft"].status, record.stages["sft"].finished_at = "running", None
    rows = {row[0]: row for row in stage_rows(record, now=1070.0)}
    assert rows["sft"][2:6] == ["running", "no", "1", "1m 10s"]


# --- the command line -----------------------------------------------------------------------

def _cli(storage, *argv) -> int:
    return main([*argv, "--storage", storage.uri])


def test_cli_logs_all_stages_and_one(storage, capsys):
    save_record(storage, _record())
    for name in ("pretrain", "sft"):
        with StageLog(storage, "r1", name) as stage_log:
            stage_log.write(f"{name} line")
    assert _cli(storage, "logs", "r1") == 0
    out = capsys.readouterr().out
    assert out.index("==> pretrain <==") < out.index("pretrain line") < out.index("==> sft <==") < out.index("sft line")
    assert _cli(storage, "logs", "r1", "--stage", "sft") == 0
    assert _messages(capsys.readouterr().out) == ["sft line"]
    assert _cli(storage, "logs", "r1", "--stage", "tok") == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "no log yet for stage tok" in captured.err


def test_cli_logs_follow_ends_when_the_run_ends(storage, capsys):
    record = _record(status="running")
    save_record(storage, record)
    stage_log = StageLog(storage, "r1", "pretrain", flush_interval_s=3600)
    stage_log.write("step 10")
    stage_log.flush()

    def finish():
        stage_log.write("step 20")
        stage_log.close()
        record.status = "succeeded"
        save_record(storage, record)

    timer = threading.Timer(0.2, finish)
    timer.start()
    assert _cli(storage, "logs", "r1", "-f") == 0
    timer.join()
    assert _messages(capsys.readouterr().out.split("\n", 1)[1]) == ["step 10", "step 20"]


def test_cli_report_writes_and_prints_the_location(storage, capsys):
    save_record(storage, _record())
    assert _cli(storage, "report", "r1") == 0
    assert capsys.readouterr().out.strip() == f"report: {storage.url('runs/r1/report.md')}"
    assert storage.exists("runs/r1/loss.png")


def test_cli_status_shows_attempts_time_metrics_and_resume(storage, capsys):
    record = _record()
    record.stages["sft"].status, record.stages["sft"].error = "failed", "RuntimeError: boom"
    save_record(storage, record)
    assert _cli(storage, "status", "r1") == 0
    out = capsys.readouterr().out
    assert out.startswith("run r1 (demo): succeeded, driver attempt 2, started 1970-01-01 00:16:40 UTC, 1m 40s\n")
    [pretrain] = [line for line in out.splitlines() if line.split()[:1] == ["pretrain"]]
    assert pretrain.split()[:6] == ["pretrain", "pretrain", "succeeded", "no", "1", "12.5s"]
    assert pretrain.endswith("loss 3.500, 1,234 tokens/s, resumed from step 20")
    assert "sft: RuntimeError: boom" in out and "pretrain: perplexity 41.25" in out
    assert _cli(storage, "status", "r1", "--json") == 0
    assert RunRecord.model_validate_json(capsys.readouterr().out) == record


@pytest.mark.parametrize("argv", [["logs", "nope"], ["logs", "nope", "-f"], ["report", "nope"], ["status", "nope"]])
def test_cli_unknown_run_exits_2_and_says_how_to_list_runs(storage, capsys, argv):
    save_record(storage, _record())
    assert _cli(storage, *argv) == 2
    err = capsys.readouterr().err
    assert "no run 'nope'" in err and "orchestrator runs --storage" in err


def test_cli_logs_unknown_stage_exits_2_and_lists_the_stages(storage, capsys):
    save_record(storage, _record())
    assert _cli(storage, "logs", "r1", "--stage", "nope") == 2
    assert "its stages: tok, pretrain, sft, eval" in capsys.readouterr().err
