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
