#!/usr/bin/env python3
"""Deterministic task files for the demo's fine-tuning and evaluation stages.

Two small skills a tiny model can pick up in a few dozen steps, over the corpus's own words:
- plurals: "One fox, two" -> " foxes"          (fine-tuning rows; a multiple-choice test set)
- colors:  "The kite is red. The kite is" -> " red"  (fine-tuning rows; an exact-match test set)
The test sets use words the fine-tuning rows never show, so they measure the skill, not recall.

    python examples/make_tasks.py examples/tasks
"""

from __future__ import annotations

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_corpus import ANIMALS, OBJECTS  # noqa: E402

COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "brown", "black", "white")


def plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def main(out_dir: str, seed: int = 0) -> None:
    rng = random.Random(seed)
    nouns = sorted(set(ANIMALS) | set(OBJECTS))
    rng.shuffle(nouns)
    held_out, seen = nouns[:40], nouns[40:]
    files = {
        "plurals.jsonl": [{"prompt": f"One {n}, two", "response": f" {plural(n)}"} for n in seen],
        "colors.jsonl": [{"prompt": f"The {n} is {c}. The {n} is", "response": f" {c}"}
                         for n in seen for c in [rng.choice(COLORS)]],
        "plurals_mc.jsonl": [{"context": f"One {n}, two", "choices": [f" {plural(n)}", f" {n}", f" {n}ed"],
                              "answer": 0} for n in held_out],
        "colors_em.jsonl": [{"prompt": f"The {n} is {c}. The {n} is", "answer": c}
                            for n in held_out for c in [rng.choice(COLORS)]],
    }
    os.makedirs(out_dir, exist_ok=True)
    for name, rows in files.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "tasks"))
