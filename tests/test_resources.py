"""Unit tests of the scheduler's resource decisions (orchestrator/resources.py): sums, fitting,
reserving and releasing, and refusing a stage no cluster state could hold. No Ray."""

from __future__ import annotations

import pytest

from orchestrator.resources import DEFAULT_BUNDLES, add, fits, never_fits, subtract, total
from orchestrator.spec import EvaluateStage, FinetuneStage, PretrainStage


def _same(a: dict, b: dict) -> bool:
    """Equal amounts, a missing resource counting as 0."""
    return all(abs(a.get(k, 0.0) - b.get(k, 0.0)) < 1e-9 for k in a.keys() | b.keys())


# --- total / fits / add / subtract ----------------------------------------------------------

def test_total_sums_every_bundle():
    assert total([{"CPU": 1.0, "GPU": 1.0}] * 4) == {"CPU": 4.0, "GPU": 4.0}
    assert total([{"CPU": 2.0}, {"CPU": 0.5, "GPU": 1.0}]) == {"CPU": 2.5, "GPU": 1.0}
    assert total([]) == {}
    assert total(DEFAULT_BUNDLES) == {"CPU": 1.0}


def test_total_does_not_modify_the_bundles():
    bundles = [{"CPU": 1.0}, {"CPU": 1.0}]
    total(bundles)
    assert bundles == [{"CPU": 1.0}, {"CPU": 1.0}]


@pytest.mark.parametrize("need, free, ok", [
    ({"CPU": 2.0}, {"CPU": 2.0}, True),  # exactly fills
    ({"CPU": 1.0}, {"CPU": 2.0}, True),
    ({"CPU": 3.0}, {"CPU": 2.0}, False),
    ({"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0}, False),  # a GPU asked of a CPU-only cluster
    ({"CPU": 1.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 0.0}, False),
    ({"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, True),
    ({"CPU": 1.0, "GPU": 0.0}, {"CPU": 1.0}, True),  # asking 0 of a resource needs none of it
    ({}, {}, True),
    ({"CPU": 1.0}, {}, False),
    ({"CPU": 0.1 + 0.1 + 0.1}, {"CPU": 0.3}, True),  # float noise does not refuse an exact fit
    ({"CPU": 0.3}, {"CPU": 0.1 + 0.1 + 0.1}, True),
    ({"CPU": 1.0}, {"CPU": 0.9999}, False),
])
def test_fits(need, free, ok):
    assert fits(need, free) is ok


def test_fits_after_releasing_float_shares():
    """Reserving and releasing fractional CPUs must not leave the cluster looking smaller."""
    free = {"CPU": 1.0}
    for _ in range(10):
        free = subtract(free, {"CPU": 0.1})
    for _ in range(10):
        free = add(free, {"CPU": 0.1})
    assert fits({"CPU": 1.0}, free)


def test_subtract_then_add_round_trips():
    free = {"CPU": 8.0, "GPU": 2.0}
    need = {"CPU": 3.0, "GPU": 1.0}
    left = subtract(free, need)
    assert left == {"CPU": 5.0, "GPU": 1.0}
    assert add(left, need) == free
    # neither argument is modified
    assert free == {"CPU": 8.0, "GPU": 2.0} and need == {"CPU": 3.0, "GPU": 1.0}


def test_round_trip_with_a_resource_only_one_side_has():
    free = {"CPU": 4.0}
    need = {"CPU": 1.0, "GPU": 0.0}
    assert _same(add(subtract(free, need), need), free)
    assert _same(subtract(add(free, {"GPU": 1.0}), {"GPU": 1.0}), free)


# --- never_fits -----------------------------------------------------------------------------

NODE = {"CPU": 4.0}


def test_never_fits_is_none_when_the_stage_fits():
    assert never_fits("train", [{"CPU": 1.0}] * 2, {"CPU": 4.0}, [NODE]) is None
    assert never_fits("train", [{"CPU": 2.0}] * 2, {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}]) is None
    assert never_fits("train", [{"CPU": 1.0, "GPU": 1.0}] * 2, {"CPU": 16.0, "GPU": 2.0},
                      [{"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]) is None
    # busy or not, a cluster exactly as large as the stage can hold it
    assert never_fits("eval", [{"CPU": 4.0}], {"CPU": 4.0}, [NODE]) is None
    # without node information only the total is checked
    assert never_fits("train", [{"CPU": 3.0}], {"CPU": 4.0}, []) is None


def test_never_fits_gpu_on_a_cpu_only_cluster():
    message = never_fits("train", [{"CPU": 1.0, "GPU": 1.0}] * 2, {"CPU": 8.0}, [{"CPU": 8.0}])
    assert message is not None
    assert message.startswith("stages.train: ")
    assert "needs 2 GPU in all" in message
    assert "2 x {CPU: 1, GPU: 1}" in message
    assert "the cluster has 0 GPU" in message
    assert "set use_gpu: false or add GPU nodes" in message


def test_never_fits_a_custom_resource_no_node_type_offers():
    message = never_fits("train", [{"CPU": 1.0, "H100": 1.0}] * 2, {"CPU": 8.0, "A10G": 4.0}, [{"CPU": 8.0}],
                         {"a10g": {"CPU": 4.0, "A10G": 1.0}})
    assert message == ("stages.train: needs 2 H100 in all (2 x {CPU: 1, H100: 1}), but the cluster has 0 H100; "
                       "add a node type that offers H100, or drop it from resources_per_worker")


def test_never_fits_too_few_cpus_in_all():
    message = never_fits("sft", [{"CPU": 2.0}] * 3, {"CPU": 4.0}, [{"CPU": 2.0}, {"CPU": 2.0}])
    assert message == ("stages.sft: needs 6 CPU in all (3 x {CPU: 2}), but the cluster has 4 CPU; "
                       "lower num_workers or add nodes")


def test_never_fits_a_bundle_larger_than_every_node():
    # 4 CPUs in all would hold 3, but no single node has 3
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]
    message = never_fits("train", [{"CPU": 3.0}], {"CPU": 4.0}, nodes)
    assert message is not None
    assert message.startswith("stages.train: one worker needs {CPU: 3}")
    assert "no node is that large" in message
    assert "nodes: {CPU: 2}, {CPU: 2}" in message
    assert "lower cpus_per_worker or add larger nodes" in message


def test_never_fits_a_gpu_worker_needing_more_cpus_than_any_gpu_node():
    # CPUs and GPUs in all suffice, but the GPU node is too small in CPUs and the big node has no GPU
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 16.0}]
    message = never_fits("train", [{"CPU": 4.0, "GPU": 1.0}], {"CPU": 18.0, "GPU": 1.0}, nodes)
    assert message is not None and "one worker needs {CPU: 4, GPU: 1}" in message
    assert "{CPU: 2, GPU: 1}, {CPU: 16}" in message


def test_never_fits_with_real_stage_bundles():
    train = PretrainStage.model_validate({"kind": "pretrain", "data": "corpus", "num_workers": 2, "use_gpu": True})
    assert train.bundles() == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert "needs 2 GPU in all" in never_fits("train", train.bundles(), {"CPU": 8.0}, [{"CPU": 8.0}])
    wide = PretrainStage.model_validate({"kind": "pretrain", "data": "corpus", "num_workers": 1,
                                         "cpus_per_worker": 3})
    assert "one worker needs {CPU: 3}" in never_fits("wide", wide.bundles(), {"CPU": 4.0}, [{"CPU": 2.0}] * 2)
    ev = EvaluateStage.model_validate({"kind": "evaluate", "models": ["train"], "data": "corpus", "cpus": 2})
    assert ev.bundles() == [{"CPU": 2.0}]
    assert never_fits("eval", ev.bundles(), {"CPU": 2.0}, [{"CPU": 2.0}]) is None


# --- the scheduler's rule, simulated ----------------------------------------------------------
# The runner starts a waiting stage when total(bundles) fits in what running stages leave free,
# reserves it with subtract, and returns it with add when the stage ends.

CLUSTER = {"CPU": 2.0}
# two fine-tunes, each 1 CPU x 1 worker, and a stage asking 2 CPUs
FT_A = FinetuneStage.model_validate({"kind": "finetune", "init": "p", "data": "c", "num_workers": 1}).bundles()
FT_B = FinetuneStage.model_validate({"kind": "finetune", "init": "p", "data": "c", "num_workers": 1,
                                     "cpus_per_worker": 1}).bundles()
BIG = [{"CPU": 2.0}]


def test_two_one_cpu_stages_run_together_on_two_cpus():
    assert FT_A == FT_B == [{"CPU": 1.0}]
    free = dict(CLUSTER)
    assert fits(total(FT_A), free)
    free = subtract(free, total(FT_A))
    assert fits(total(FT_B), free)
    free = subtract(free, total(FT_B))
    assert free == {"CPU": 0.0}
    # the 2-CPU stage cannot start beside them
    assert not fits(total(BIG), free)


@pytest.mark.parametrize("running", [FT_A, FT_B])
def test_the_two_cpu_stage_cannot_start_beside_either(running):
    free = subtract(CLUSTER, total(running))
    assert not fits(total(BIG), free)
    # ...and once that stage ends it can
    assert fits(total(BIG), add(free, total(running)))
    # nor can either small stage start beside the big one
    beside_big = subtract(CLUSTER, total(BIG))
    assert not fits(total(running), beside_big)


def _schedule(stages: dict[str, list[dict]], cluster: dict) -> list[set[str]]:
    """The runner's loop without Ray: every round, start what fits in waiting order, then finish
    the stages that are running (all at once). Returns the sets of stages that ran together."""
    free, waiting, rounds = dict(cluster), list(stages), []
    for name, bundles in stages.items():
        assert never_fits(name, bundles, cluster, [cluster]) is None
    while waiting:
        running = set()
        for name in list(waiting):
            need = total(stages[name])
            if fits(need, free):
                free = subtract(free, need)
                running.add(name)
                waiting.remove(name)
        assert running, "nothing could start: the loop would wait forever"
        assert all(v >= -1e-9 for v in free.values()), free  # never oversubscribed
        rounds.append(running)
        for name in running:
            free = add(free, total(stages[name]))
        assert _same(free, cluster)
    return rounds


def test_schedule_runs_the_fine_tunes_together_and_the_big_stage_alone():
    assert _schedule({"ft_a": FT_A, "ft_b": FT_B, "big": BIG}, CLUSTER) == [{"ft_a", "ft_b"}, {"big"}]
    assert _schedule({"big": BIG, "ft_a": FT_A, "ft_b": FT_B}, CLUSTER) == [{"big"}, {"ft_a", "ft_b"}]
    assert _schedule({"ft_a": FT_A, "big": BIG, "ft_b": FT_B}, CLUSTER) == [{"ft_a", "ft_b"}, {"big"}]
