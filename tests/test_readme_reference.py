"""README.md's pipeline-file reference is what orchestrator/reference_docs.py generates from the
models, field for field: a field added, renamed, reclassified or redocumented without regenerating
the README fails here, and so does a field (or model) without a docstring. No Ray."""

from __future__ import annotations

import os
import re

from pydantic import BaseModel, ConfigDict

from jobs.fields import hashing_of, operational, output
from orchestrator.kinds import KINDS
from orchestrator.reference_docs import (
    REGENERATE,
    _kind_anchor,
    marked_region,
    missing_docs,
    pipeline_reference,
    readme_with_reference,
    undocumented,
)

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _section(reference: str, anchor: str) -> str:
    return reference.split(f'<a id="{anchor}"></a>', 1)[1].split("<a id=", 1)[0]


def _row(section: str, field: str) -> list[str]:
    line = next((line for line in section.splitlines() if line.startswith(f"| `{field}` |")), None)
    assert line is not None, f"no row for {field}"
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_the_readme_reference_is_the_generated_one():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert marked_region(text) == pipeline_reference(), f"README.md's pipeline reference is stale: run `{REGENERATE}`"


def test_every_field_of_every_kind_is_in_its_section_with_its_hashing():
    reference = pipeline_reference()
    for name, kind in KINDS.items():
        section = _section(reference, _kind_anchor(name))
        for field, info in kind.spec.model_fields.items():
            hashed = _row(section, field)[3]
            assert hashed == {"output": "hashed", "operational": "operational"}[hashing_of(info)], (name, field)
    pretrain = _section(reference, _kind_anchor("pretrain"))
    assert _row(pretrain, "cpus_per_worker")[3] == "operational"
    assert _row(pretrain, "lr")[2:4] == ["`0.0003`", "hashed"]
    assert _row(pretrain, "steps")[1] == "`int`, ≥ 1"


def test_nested_models_have_sections_and_links():
    reference = pipeline_reference()
    for model in ("SourceSpec", "NormalizeSpec", "FilterSpec", "ModelSpec", "TaskSpec", "SFTTaskSpec", "LocalPath",
                  "ModelRef", "ScheduleSpec", "GateSpec", "GateMetric"):
        assert f"#### `{model}`" in reference, model
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', reference))
    links = set(re.findall(r"\]\(#([^)]+)\)", reference))
    assert links and links <= anchors, links - anchors


def test_every_field_and_model_is_documented():
    """A field without a docstring would leave its row unexplained: document it under the field."""
    assert undocumented() == []


def test_an_undocumented_field_is_reported():
    class Documented(BaseModel):
        """Has docs."""

        model_config = ConfigDict(use_attribute_docstrings=True)
        fine: int = output(1)
        """Explained."""
        bare: int = operational(2)

    class Bare(BaseModel):
        x: int = 0

    assert missing_docs([(Documented, None), (Bare, None)]) == ["Documented.bare", "Bare", "Bare.x"]


def test_write_replaces_only_the_marked_region():
    readme = "# t\n\nbefore\n<!-- pipeline-reference:start -->\nold\n<!-- pipeline-reference:end -->\nafter\n"
    written = readme_with_reference(readme)
    assert written.startswith("# t\n\nbefore\n") and written.endswith("<!-- pipeline-reference:end -->\nafter\n")
    assert marked_region(written) == pipeline_reference()
    assert readme_with_reference(written) == written
