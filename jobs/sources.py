"""Corpus sources: find the files, cut them into shards, and read a shard's records.

Sharding is by byte range for line formats (jsonl, text): one large file still spreads over all
workers, and a shard is fully described by (uri, start, end), so the driver plans every shard
from file sizes alone, without reading the corpus. A shard owns each line whose first byte lies
in [start, end); the reader finishes the last line past `end`, so lines are never split or read
twice.

jsonl and text are read line by line here rather than through `datasets`, because every bad
record (invalid UTF-8, invalid JSON, wrong type, missing field) must be counted and quarantined
with its line number instead of failing the whole file. json (one array per file) and parquet
have no line structure; a file is one shard and is read with `datasets` in streaming mode.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from jobs.fields import output
from jobs.storage import open_storage, split_uri

SourceFormat = Literal["jsonl", "json", "parquet", "text"]
_GLOB_CHARS = re.compile(r"[*?\[]")
_READ_AHEAD = 1 << 20  # bytes fetched at a time to finish a shard's last line


class SourceSpec(BaseModel):
    """Where a corpus is read from."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    paths: list[str] = output(min_length=1, local="glob")
    """Local paths or globs (relative to the current directory) and `s3://bucket/key` URIs or globs."""
    format: SourceFormat = output("jsonl")
    """File format: jsonl (one JSON object per line), json (an array of objects), parquet, text (one document per line)."""
    text_field: str = output("text")
    """The field holding the document text (ignored for `text`)."""

    @field_validator("paths")
    @classmethod
    def _no_empty_paths(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path.strip():
                raise ValueError("an empty path; give a file, a glob such as data/*.jsonl, or an s3:// URI")
        return paths


class SourceError(ValueError):
    """A source cannot be read at all (a user mistake: reported before any worker starts)."""


@dataclass(frozen=True)
class SourceFile:
    uri: str
    size: int
    version: str  # mtime or ETag: part of the stage hash, so a changed file reruns the stage


@dataclass(frozen=True)
class Shard:
    index: int
    uri: str
    format: SourceFormat
    start: int
    end: int


@dataclass(frozen=True)
class BadRecord:
    line: int  # 1-based line (jsonl/text) or record number (json/parquet) within the shard
    offset: int  # absolute byte offset of the line in the file (-1 where there is none)
    reason: str
    excerpt: str


def list_source_files(spec: SourceSpec) -> list[SourceFile]:
    """Every file the spec names, in a stable order; SourceError names a path that matches nothing."""
    files: dict[str, SourceFile] = {}
    for i, pattern in enumerate(spec.paths):
        matched = _expand(pattern)
        if not matched:
            raise SourceError(
                f"source.paths[{i}]: {pattern!r} matches no file (relative paths are read from {os.getcwd()}); "
                "check the path or glob"
            )
        for f in matched:
            files.setdefault(f.uri, f)
    return sorted(files.values(), key=lambda f: f.uri)


def _expand(pattern: str) -> list[SourceFile]:
    if pattern.startswith("s3://"):
        return _expand_s3(pattern)
    path = pattern[len("file://"):] if pattern.startswith("file://") else pattern
    paths = glob.glob(path, recursive=True) if _GLOB_CHARS.search(path) else [path]
    found = []
    for p in paths:
        if os.path.isfile(p):
            st = os.stat(p)
            # ctime too: `cp -p` or `touch -r` can restore an mtime, nothing restores a ctime.
            found.append(SourceFile("file://" + os.path.abspath(p), st.st_size, f"{st.st_mtime_ns}-{st.st_ctime_ns}"))
    return found


def _expand_s3(pattern: str) -> list[SourceFile]:
    bucket, _, key_pattern = pattern[len("s3://"):].partition("/")
    root = open_storage(f"s3://{bucket}")
    match = _GLOB_CHARS.search(key_pattern)
    if not match:
        info = root.info(key_pattern) if key_pattern else None
        return [SourceFile(pattern, info.size, info.version)] if info else []
    literal_prefix = key_pattern[: match.start()]
    regex = _glob_regex(key_pattern)
    return [
        SourceFile(f"s3://{bucket}/{o.key}", o.size, o.version)
        for o in root.list(literal_prefix)
        if regex.fullmatch(o.key)
    ]


def _glob_regex(pattern: str) -> re.Pattern:
    """Glob semantics for object keys, as the local glob has them: `*` and `?` stay within one
    path segment, `**/` spans zero or more directories."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            end = pattern.index("]", i + 2)
            body = pattern[i + 1:end]
            out.append("[^" + re.escape(body[1:]) + "]" if body[:1] in "!^" and body else "[" + re.escape(body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out), re.S)


def plan_shards(files: list[SourceFile], fmt: SourceFormat, shard_bytes: int) -> list[Shard]:
    shards: list[Shard] = []
    for f in files:
        if fmt in ("jsonl", "text") and f.size > shard_bytes:
            for start in range(0, f.size, shard_bytes):
                shards.append(Shard(len(shards), f.uri, fmt, start, min(start + shard_bytes, f.size)))
        else:
            shards.append(Shard(len(shards), f.uri, fmt, 0, f.size))
    return shards


class ShardReader:
    """Iterates a shard's records: (line, text) for each good one, a BadRecord for each bad one.

    After iteration, `num_lines` is the number of lines the shard owns (jsonl/text), which the
    driver adds up to turn shard-relative line numbers into line numbers within the file.
    """

    def __init__(self, shard: Shard, text_field: str):
        self.shard = shard
        self.text_field = text_field
        self.num_lines = 0

    def __iter__(self) -> Iterator[tuple[int, str] | BadRecord]:
        if self.shard.format == "text":
            return _text_records(self._lines())
        if self.shard.format == "jsonl":
            return _jsonl_records(self._lines(), self.text_field)
        return _table_records(self.shard, self.text_field)

    def _lines(self) -> Iterator[tuple[int, int, bytes]]:
        for number, offset, raw in _read_lines(self.shard):
            self.num_lines = number
            yield number, offset, raw


def _read_lines(shard: Shard) -> Iterator[tuple[int, int, bytes]]:
    """(line number within the shard, absolute offset, raw line without its newline)."""
    storage, key = split_uri(shard.uri)
    # Read one byte before `start` to know whether a line begins exactly at `start`.
    begin = max(shard.start - 1, 0)
    data = storage.read_range(key, begin, shard.end) if shard.end > begin else b""
    size = None
    while data and not data.endswith(b"\n"):
        if size is None:
            size = storage.info(key).size
        pos = begin + len(data)
        if pos >= size:
            break
        chunk = storage.read_range(key, pos, min(pos + _READ_AHEAD, size))
        newline = chunk.find(b"\n")
        data += chunk if newline < 0 else chunk[: newline + 1]
    first = 0
    if shard.start > 0:
        newline = data.find(b"\n")
        if newline < 0:
            return  # the shard lies inside one line that an earlier shard owns
        first = newline + 1
    offset = begin + first
    for number, raw in enumerate(data[first:].split(b"\n"), start=1):
        if offset >= begin + len(data):
            break
        yield number, offset, raw.removesuffix(b"\r")
        offset += len(raw) + 1


def _decode(number: int, offset: int, raw: bytes) -> str | BadRecord:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRecord(number, offset, "invalid_utf8", f"{e.reason} at byte {e.start}: {raw[:200]!r}")


def _text_records(lines) -> Iterator[tuple[int, str] | BadRecord]:
    for number, offset, raw in lines:
        if raw.strip():
            text = _decode(number, offset, raw)
            yield text if isinstance(text, BadRecord) else (number, text)


def _jsonl_records(lines, text_field: str) -> Iterator[tuple[int, str] | BadRecord]:
    for number, offset, raw in lines:
        if not raw.strip():
            continue
        line = _decode(number, offset, raw)
        if isinstance(line, BadRecord):
            yield line
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield BadRecord(number, offset, "invalid_json", f"{e.msg}: {line[:200]}")
            continue
        yield _field(record, text_field, number, offset)


def _field(record, text_field: str, number: int, offset: int) -> tuple[int, str] | BadRecord:
    if not isinstance(record, dict):
        return BadRecord(number, offset, "not_an_object", repr(record)[:200])
    if text_field not in record or record[text_field] is None:
        return BadRecord(number, offset, "missing_field", f"no {text_field!r} in {sorted(record)[:10]}")
    text = record[text_field]
    if not isinstance(text, str):
        return BadRecord(number, offset, "wrong_type", f"{text_field!r} is {type(text).__name__}: {repr(text)[:200]}")
    return number, text


def _table_records(shard: Shard, text_field: str) -> Iterator[tuple[int, str] | BadRecord]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="orchestrator-source-") as tmp:
        storage, key = split_uri(shard.uri)
        local = os.path.join(tmp, os.path.basename(key))
        storage.download_file(key, local)
        builder = "parquet" if shard.format == "parquet" else "json"
        try:
            rows = list(datasets.load_dataset(builder, data_files=local, split="train", streaming=True))
        except Exception as e:  # datasets cannot type this file: fall back to plain JSON per record
            if shard.format != "json":
                raise SourceError(f"{shard.uri}: not a readable parquet file ({e})") from e
            try:
                with open(local, encoding="utf-8") as fh:
                    rows = json.load(fh)
            except (UnicodeDecodeError, json.JSONDecodeError) as parse_error:
                yield BadRecord(1, -1, "invalid_json", f"the whole file: {parse_error}"[:300])
                return
            if not isinstance(rows, list):
                rows = [rows]
    for number, record in enumerate(rows, start=1):
        yield _field(record, text_field, number, -1)
