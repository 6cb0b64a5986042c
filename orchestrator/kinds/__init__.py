"""The registry of stage kinds: the one place that lists them. Everything the control plane knows
about a kind (spec, version, run function, references, resources, summary) comes from its
StageKind; adding a kind is a module in this package plus one line here."""

from __future__ import annotations

from orchestrator.kinds import evaluate, finetune, preprocess, pretrain, tokenizer
from orchestrator.kinds.base import StageKind

KINDS: dict[str, StageKind] = {k.name: k for k in (tokenizer.KIND, preprocess.KIND, pretrain.KIND, finetune.KIND,
                                                  evaluate.KIND)}
