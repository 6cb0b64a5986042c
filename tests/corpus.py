"""A test corpus whose expected outcomes are known by construction: which documents are
duplicates (always in another file than their original), and where each bad line is."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass, field

_GENERATOR = os.path.join(os.path.dirname(__file__), "..", "examples", "make_corpus.py")

# (raw line, the reason the stage must quarantine it for)
BAD_LINES = [
    (b'{"text": "not closed', "invalid_json"),
    (b'{"text": 12345}', "wrong_type"),
    (b'{"body": "no text field here"}', "missing_field"),
    (b'{"text": "bad bytes \xff\xfe here"}', "invalid_utf8"),
    (b'["an", "array"]', "not_an_object"),
]


def generate_documents(num_docs: int, seed: int) -> list[str]:
    spec = importlib.util.spec_from_file_location("make_corpus", _GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_documents(num_docs, seed)


@dataclass
class Corpus:
    files: list[str]
    glob: str
    documents: list[str] = field(default_factory=list)  # every good row, duplicates included
    num_duplicates: int = 0
    bad_lines: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason)


def make_corpus(directory: str, num_files: int = 3, docs_per_file: int = 300, num_duplicates: int = 15,
                seed: int = 7) -> Corpus:
    rng = random.Random(seed)
    docs = generate_documents(num_files * docs_per_file, seed)
    rows: list[list[bytes]] = [
        [json.dumps({"text": d}).encode() for d in docs[i * docs_per_file:(i + 1) * docs_per_file]]
        for i in range(num_files)
    ]
    texts: list[list[str | None]] = [list(docs[i * docs_per_file:(i + 1) * docs_per_file]) for i in range(num_files)]
    for n in range(num_duplicates):
        source = n % num_files
        target = (source + 1 + n % (num_files - 1)) % num_files
        original = rng.randrange(docs_per_file)
        position = rng.randrange(len(rows[target]) + 1)
        rows[target].insert(position, rows[source][original])
        texts[target].insert(position, texts[source][original])
    for n, (raw, _) in enumerate(BAD_LINES):
        target = n % num_files
        position = rng.randrange(len(rows[target]) + 1)
        rows[target].insert(position, raw)
        texts[target].insert(position, None)
    corpus = Corpus(files=[], glob=os.path.join(directory, "*.jsonl"), num_duplicates=num_duplicates)
    reasons = dict(BAD_LINES)
    for i, file_rows in enumerate(rows):
        path = os.path.join(directory, f"part-{i}.jsonl")
        with open(path, "wb") as f:
            f.write(b"\n".join(file_rows) + b"\n")
        corpus.files.append(path)
        for line, (raw, text) in enumerate(zip(file_rows, texts[i]), start=1):
            if text is None:
                corpus.bad_lines.append((path, line, reasons[raw]))
    # Corpus order (file by file, line by line) decides which copy dedup keeps: the first.
    corpus.documents = [t for file_texts in texts for t in file_texts if t is not None]
    return corpus
