"""`orchestrator lease show|break STAGE_OUTPUT_URI`: what an operator does about a run that died
holding a stage (the waiting run's message names this command)."""

from __future__ import annotations

from jobs.storage import open_storage
from orchestrator import lease
from orchestrator.cli import main


def test_break_makes_the_holder_lose_its_lease_and_frees_the_stage(tmp_path, capsys):
    uri = f"file://{tmp_path}/stages/pretrain-1a2b3c4d"
    held = lease.acquire(open_storage(uri), "nightly-1", "pretrain")
    assert isinstance(held, lease.Lease)

    assert main(["lease", "show", uri]) == 0
    assert "held: run nightly-1" in capsys.readouterr().out

    assert main(["lease", "break", uri]) == 0
    assert "broke run nightly-1's lease" in capsys.readouterr().out
    assert not held.still_held()  # the holder, if alive, stops before committing
    taken = lease.acquire(open_storage(uri), "nightly-2", "pretrain")
    assert isinstance(taken, lease.Lease) and taken.took_over is None  # free at once, no timeout to wait out

    assert main(["lease", "show", uri]) == 0
    assert "held: run nightly-2" in capsys.readouterr().out


def test_break_of_a_free_stage_changes_nothing(tmp_path, capsys):
    uri = f"file://{tmp_path}/stages/tok-00000000"
    assert main(["lease", "break", uri]) == 0
    assert "no lease" in capsys.readouterr().out
    assert lease.read_latest(open_storage(uri)) is None


def test_a_uri_that_is_not_a_stage_output_is_bad_input(tmp_path, capsys):
    assert main(["lease", "break", f"file://{tmp_path}/runs/r1"]) == 2
    err = capsys.readouterr().err
    assert "is not a stage output" in err and "/stages/<name>-<hash>" in err
