"""Corpus sources: find the files, check that they hold what the format says, and cut them into
shards (reading a shard's records is jobs/source_readers.py).

Planning needs no pass over the corpus. Line formats (jsonl, text) shard by byte range, so one
large file still spreads over all workers and a shard is planned from file sizes alone; a
compressed file (`.gz`, `.zst`) cannot be entered in the middle and is one shard. A parquet file
shards by row groups, planned from its footer (one ranged read per file). An arrow file
(`save_to_disk`) and a json file are one shard each.
"""

from __future__ import annotations

import glob
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, field_validator

from jobs.fields import output
from jobs.source_readers import (BadRecord, Shard, ShardReader, SourceError, SourceFormat, compression_of,
                                 parquet_file, split_shared)
from jobs.storage import Storage, open_storage

__all__ = ["BadRecord", "Shard", "ShardReader", "SourceError", "SourceFile", "SourceFormat", "SourceSpec",
           "check_source_content", "list_source_files", "plan_shards"]

_GLOB_CHARS = re.compile(r"[*?\[]")
_ARROW_DATA_FILES = "data-*.arrow"  # what save_to_disk writes into its directory (besides json metadata)
_NUM_READ_THREADS = 8  # files whose first bytes or footer the driver reads at once


class SourceSpec(BaseModel):
    """Where a corpus is read from."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    paths: list[str] = output(min_length=1, local="glob")
    """Local paths or globs (relative to the current directory) and `s3://bucket/key` URIs or globs."""
    format: SourceFormat = output("jsonl")
    """File format: jsonl (one JSON object per line), json (an array of objects), parquet, arrow (a directory
    written by Hugging Face `save_to_disk`, or its `data-*.arrow` files), text (one document per line).
    jsonl and text files may be compressed: `.gz` or `.zst` after the name (`x.jsonl.gz`), by extension."""
    text_field: str = output("text")
    """The field holding the document text (ignored for `text`)."""

    @field_validator("paths")
    @classmethod
    def _no_empty_paths(cls, paths: list[str]) -> list[str]:
        for path in paths:
            if not path.strip():
                raise ValueError("an empty path; give a file, a glob such as data/*.jsonl, or an s3:// URI")
        return paths


@dataclass(frozen=True)
class SourceFile:
    uri: str
    size: int
    version: str  # mtime or ETag: part of the stage hash, so a changed file reruns the stage


def list_source_files(spec: SourceSpec) -> list[SourceFile]:
    """Every file the spec names, in a stable order; SourceError names a path that matches nothing."""
    files: dict[str, SourceFile] = {}
    for i, pattern in enumerate(spec.paths):
        matched = _expand(pattern)
        if not matched and spec.format == "arrow" and not _GLOB_CHARS.search(pattern):
            matched = _expand(f"{pattern.rstrip('/')}/{_ARROW_DATA_FILES}")  # a save_to_disk directory
        if not matched:
            what = f"no file, nor a directory of {_ARROW_DATA_FILES} files" if spec.format == "arrow" else "no file"
            raise SourceError(
                f"source.paths[{i}]: {pattern!r} matches {what} (relative paths are read from {os.getcwd()}); "
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
    """Shards of about `shard_bytes` of source data each, numbered in file order."""
    shards: list[Shard] = []
    if fmt == "parquet":  # footers read in parallel: on S3 each is a request or two
        storages: dict[str, Storage] = {}
        with ThreadPoolExecutor(_NUM_READ_THREADS) as pool:
            row_groups = list(pool.map(lambda f: _row_group_ranges(f.uri, shard_bytes, storages), files))
    for i, f in enumerate(files):
        if fmt == "parquet":
            ranges = row_groups[i]
        elif fmt in ("jsonl", "text") and not compression_of(f.uri) and f.size > shard_bytes:
            ranges = [(start, min(start + shard_bytes, f.size)) for start in range(0, f.size, shard_bytes)]
        else:
            ranges = [(0, f.size)]
        shards += [Shard(len(shards) + i, f.uri, fmt, start, end) for i, (start, end) in enumerate(ranges)]
    return shards


def _row_group_ranges(uri: str, shard_bytes: int, storages: dict[str, Storage]) -> list[tuple[int, int]]:
    """Consecutive row groups, up to `shard_bytes` of (compressed) file bytes each, at least one per
    range: [first, after last). A file without row groups is one empty range."""
    metadata = parquet_file(uri, storages).metadata
    ranges, first, size = [], 0, 0
    for i in range(metadata.num_row_groups):
        group = metadata.row_group(i)
        group_bytes = sum(group.column(c).total_compressed_size for c in range(group.num_columns))
        if i > first and size + group_bytes > shard_bytes:
            ranges.append((first, i))
            first, size = i, 0
        size += group_bytes
    ranges.append((first, metadata.num_row_groups))
    return ranges


# --- content checks -------------------------------------------------------------------------

_HEAD_BYTES = 4096  # read from the start of each checked file
_MAX_S3_CHECKS = 64
_MAX_BINARY_SHARE = 0.1  # of a head's characters that are not UTF-8 (a few bad lines are quarantined)
# (name, magic bytes); xz and zip are recognized only to say that they are not read
_MAGIC = [("gzip", b"\x1f\x8b"), ("zstd", b"\x28\xb5\x2f\xfd"), ("xz", b"\xfd7zXZ\x00"), ("zip", b"PK\x03\x04"),
          ("parquet", b"PAR1"), ("arrow", b"\xff\xff\xff\xff"), ("arrow", b"ARROW1")]
_SUFFIX = {"gzip": ".gz", "zstd": ".zst"}
# The extensions a format's files usually have (after a compression suffix is removed).
_EXTENSIONS = {"jsonl": {".jsonl", ".json", ".ndjson", ".jl"}, "json": {".json"}, "text": {".txt", ".text"},
               "parquet": {".parquet", ".pq"}, "arrow": {".arrow"}}


def check_source_content(files: list[SourceFile], spec: SourceSpec) -> None:
    """SourceError naming every file whose first bytes do not match the source's format, and the fix.

    Local files are all checked. On S3 each check is a ranged GET, so at most the first
    _MAX_S3_CHECKS files are, plus every file whose name does not look like the format's; a
    mislabeled file past those still fails, later, with its bad records quarantined.
    """
    local = [f.uri for f in files if not f.uri.startswith("s3://")]
    remote = [f.uri for f in files if f.uri.startswith("s3://")]
    remote = remote[:_MAX_S3_CHECKS] + [uri for uri in remote[_MAX_S3_CHECKS:] if _unusual_name(uri, spec.format)]
    storages: dict[str, Storage] = {}

    def problem(uri: str) -> str | None:
        storage, key = split_shared(uri, storages)
        return _content_problem(uri, storage.read_range(key, 0, _HEAD_BYTES), spec.format)

    with ThreadPoolExecutor(_NUM_READ_THREADS) as pool:
        problems = [p for p in pool.map(problem, local + remote) if p]
    if len(problems) == 1:
        raise SourceError(problems[0])
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SourceError(f"{len(problems)} files do not hold format {spec.format}:\n{shown}{more}")


def _unusual_name(uri: str, fmt: SourceFormat) -> bool:
    """Whether the name's extension, under a compression suffix, is not one usual for `fmt`."""
    name = os.path.splitext(uri)[0] if compression_of(uri) else uri
    return os.path.splitext(name)[1] not in _EXTENSIONS[fmt]


def _content_problem(uri: str, head: bytes, fmt: SourceFormat) -> str | None:
    """What is wrong with a file whose first bytes are `head`, and how to fix it; None if nothing."""
    path = uri.removeprefix("file://")
    name = os.path.basename(path)
    magic = next((kind for kind, prefix in _MAGIC if head.startswith(prefix)), None)
    declared = compression_of(uri)
    if declared and fmt in ("jsonl", "text", "json"):  # json: `datasets` decompresses it
        if magic != declared:
            found = f"starts with {magic}'s magic bytes" if magic else f"is not {declared}-compressed"
            return (f"{path} is named as {declared}-compressed but {found}: rename it "
                    f"{name.removesuffix(_SUFFIX[declared])}{_SUFFIX.get(magic, '')} or check the file")
        try:
            text = _decompress_head(head, declared)
        except Exception as e:  # zlib.error, zstandard.ZstdError: whatever the stream's fault
            return f"{path} is not a readable {declared} stream ({e}): check the file"
        return _text_problem(path, text, fmt, f" (once {declared}-decompressed)")
    if fmt in ("parquet", "arrow"):
        if magic == fmt:
            return None
        if magic:
            found = f"; it is {magic} data"
        else:
            found = "; it looks like text: use format jsonl or text" if _binary_reason(head) is None else ""
        return f"{path} is not {_article(fmt)} {fmt} file{found}: check the file or the source's format"
    if magic in _SUFFIX:
        return f"{path} starts with {magic}'s magic bytes: rename it {name}{_SUFFIX[magic]}"
    if magic in ("parquet", "arrow"):
        return f"{path} is {_article(magic)} {magic} file: set the source's format to {magic}"
    if magic:
        return f"{path} is {magic}-compressed, which is not read: decompress it, or recompress it with gzip or zstd"
    return _text_problem(path, head, fmt, "")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _decompress_head(head: bytes, compression: str) -> bytes:
    """As much of the decompressed text as the head of a compressed file gives."""
    if compression == "gzip":
        return zlib.decompressobj(wbits=31).decompress(head)
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(head)


def _text_problem(path: str, head: bytes, fmt: SourceFormat, how: str) -> str | None:
    reason = _binary_reason(head)
    if reason is None:
        return None
    return f"{path} is binary{how}, not {fmt} text ({reason}): check the file, or the source's format"


def _binary_reason(head: bytes) -> str | None:
    if b"\x00" in head:
        return f"a NUL byte at offset {head.index(0)}"
    text = head.decode("utf-8", errors="replace")
    cut = min(len(text) - len(text.rstrip("\ufffd")), 3)  # a character cut by the head's end is no fault
    bad = text.count("\ufffd") - cut
    if text and bad > _MAX_BINARY_SHARE * len(text):
        return f"{bad} of its first {len(text)} characters are not UTF-8"
    return None
