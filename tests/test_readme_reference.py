"""README.md's pipeline-file reference is what orchestrator/reference_docs.py generates from the
models, field for field: a field added, renamed, reclassified or redocumented without regenerating
the README fails here."""

from __future__ import annotations

import os

from orchestrator.kinds import KINDS
from orchestrator.reference_docs import END, REGENERATE, START, missing_descriptions, pipeline_reference

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_the_readme_reference_is_the_generated_one():
    with open(README) as f:
        text = f.read()
    assert START in text and END in text
    current = text.split(START, 1)[1].split(END, 1)[0].strip("\n")
    assert current == pipeline_reference().strip("\n"), f"README.md's reference is stale: run `{REGENERATE}`"


def test_every_field_of_every_kind_is_in_the_reference_with_its_hashing():
    reference = pipeline_reference()
    for name, kind in KINDS.items():
        section = reference.split(f"#### `kind: {name}`", 1)[1].split("####", 1)[0]
        for field in kind.spec.model_fields:
            if field != "kind":
                assert f"| `{field}` |" in section, (name, field)
    pretrain = reference.split("#### `kind: pretrain`", 1)[1].split("####", 1)[0]
    row = lambda field: next(line for line in pretrain.splitlines() if line.startswith(f"| `{field}` |"))  # noqa: E731
    assert "| operational |" in row("cpus_per_worker") and "| operational |" in row("log_every")
    assert "| hashed |" in row("lr") and "| `0.0003` |" in row("lr")


def test_every_field_has_a_description():
    """A field without a docstring would leave the reference's row unexplained."""
    assert missing_descriptions() == []
