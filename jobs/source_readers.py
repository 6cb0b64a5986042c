"""Reading one shard of a corpus: its records, with every bad one reported instead of failing.

Every format is streamed through `open_object` (ranged reads of the storage layer, local or S3),
so no reader holds a whole file in memory or on disk:

- jsonl, text: line by line. A plain file's shard is a byte range [start, end): it owns each line
  whose first byte lies in the range and finishes its last line past `end`, so lines are never
  split or read twice. A compressed file (`.gz`, `.zst`, by extension) cannot be entered in the
  middle: it is one shard, decompressed as it is read.
- parquet: `Shard.start`/`end` are a range of row groups (not bytes), read in record batches of
  the text column only.
- arrow (a Hugging Face `save_to_disk` directory's `data-*.arrow` files, Arrow IPC streams): one
  shard per file, read one record batch at a time.
- json (one array per file): a file is one shard, read whole with `datasets`, as there is no
  way to stream an array of unknown shape.

Line and record numbers are 1-based and relative to the shard; `ShardReader.num_lines` tells the
driver how many the shard owned, so it can number bad records within the file.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Iterator, Literal

import orjson

from jobs.storage import Storage, split_uri

SourceFormat = Literal["jsonl", "json", "parquet", "arrow", "text"]
Compression = Literal["gzip", "zstd"]
COMPRESSION_SUFFIXES: dict[str, Compression] = {".gz": "gzip", ".zst": "zstd"}
_STREAM_BYTES = 8 << 20  # bytes per ranged read: few requests on S3, bounded memory everywhere
_TAIL_BYTES = 64 << 10  # bytes per read past a shard's end, where only its last line's tail is wanted
_BATCH_ROWS = 1024  # rows per parquet record batch
_PARQUET_BUFFER_BYTES = 1 << 20


class SourceError(ValueError):
    """A source cannot be read at all (a user mistake: reported before any worker starts)."""


@dataclass(frozen=True)
class Shard:
    index: int
    uri: str
    format: SourceFormat
    start: int  # byte offset; for parquet the first row group
    end: int  # byte offset (exclusive); for parquet the row group after the last


@dataclass(frozen=True)
class BadRecord:
    line: int  # 1-based line (jsonl/text) or record number (json/parquet/arrow) within the shard
    offset: int  # byte offset of the line in the (decompressed) file; -1 where there is none
    reason: str
    excerpt: str


def compression_of(uri: str) -> Compression | None:
    """The compression a file's name declares ('x.jsonl.gz' -> 'gzip'), None for a plain file."""
    return COMPRESSION_SUFFIXES.get(os.path.splitext(uri)[1])


def split_shared(uri: str, storages: dict[str, Storage] | None) -> tuple[Storage, str]:
    """split_uri, with one Storage (so one S3 client, costly to build) for all the files of a
    directory that `storages` collects, for a pass over many files."""
    storage, key = split_uri(uri)
    return (storage if storages is None else storages.setdefault(uri.rpartition("/")[0], storage)), key


class _ObjectFile(io.RawIOBase):
    """A read-only, seekable file over Storage.read_range, for readers that stream (gzip, zstd,
    pyarrow): one storage interface for local files and S3 objects."""

    def __init__(self, storage: Storage, key: str, position: int, end: int | None):
        self._storage, self._key = storage, key
        self._position, self._end = position, end
        self._size: int | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            if self._size is None:
                info = self._storage.info(self._key)
                if info is None:
                    raise FileNotFoundError(f"no object at {self._storage.url(self._key)}")
                self._size = info.size
            offset += self._size
        elif whence == io.SEEK_CUR:
            offset += self._position
        self._position = max(offset, 0)
        return self._position

    def readinto(self, buffer) -> int:
        size = len(buffer)
        if self._end is not None:  # up to `end` in full, past it only a line's tail at a time
            size = min(size, self._end - self._position if self._position < self._end else _TAIL_BYTES)
        data = self._storage.read_range(self._key, self._position, self._position + size)
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


def open_object(uri: str, position: int = 0, storages: dict[str, Storage] | None = None,
                end: int | None = None) -> io.BufferedReader:
    """A buffered binary file over the object at `uri`, positioned at `position`. A reader that
    will stop near `end` says so: no read then fetches bytes far past it."""
    buffer_bytes = _STREAM_BYTES if end is None else min(max(end - position, _TAIL_BYTES), _STREAM_BYTES)
    return io.BufferedReader(_ObjectFile(*split_shared(uri, storages), position, end), buffer_bytes)


def open_decompressed(uri: str) -> io.BufferedIOBase:
    """The file's bytes, decompressed as they are read if its name says it is compressed."""
    raw = open_object(uri)
    compression = compression_of(uri)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zstd":
        import zstandard

        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20, read_across_frames=True)
        return io.BufferedReader(reader, 1 << 20)
    return raw


class ShardReader:
    """Iterates a shard's records: (line, text) for each good one, a BadRecord for each bad one.

    After iteration, `num_lines` is the number of lines (jsonl/text) or records (parquet, arrow)
    the shard owns, which the driver adds up to turn shard-relative numbers into numbers within
    the file (a json file is one shard: its record numbers are the file's already).
    """

    def __init__(self, shard: Shard, text_field: str):
        self.shard = shard
        self.text_field = text_field
        self.num_lines = 0

    def __iter__(self) -> Iterator[tuple[int, str] | BadRecord]:
        fmt = self.shard.format
        if fmt == "text":
            return _text_records(self._counted(_lines(self.shard)))
        if fmt == "jsonl":
            return _jsonl_records(self._counted(_lines(self.shard)), self.text_field)
        if fmt == "parquet":
            return _column_records(self._counted(_parquet_values(self.shard, self.text_field)), self.text_field)
        if fmt == "arrow":
            return _column_records(self._counted(_arrow_values(self.shard, self.text_field)), self.text_field)
        return _json_records(self.shard, self.text_field)

    def _counted(self, items: Iterator[tuple]) -> Iterator[tuple]:
        for item in items:
            self.num_lines = item[0]
            yield item


# --- line formats ---------------------------------------------------------------------------

def _lines(shard: Shard) -> Iterator[tuple[int, int, bytes]]:
    """(line number within the shard, byte offset in the file, raw line without its newline)."""
    if compression_of(shard.uri):
        with open_decompressed(shard.uri) as stream:
            yield from _numbered_lines(stream, 0, None)
        return
    # Read from one byte before `start`: the rest of that line belongs to the shard before.
    begin = max(shard.start - 1, 0)
    with open_object(shard.uri, begin, end=shard.end) as stream:
        offset = begin
        if shard.start > 0:
            skipped = stream.readline()
            if not skipped.endswith(b"\n"):
                return  # the file ends inside a line that an earlier shard owns
            offset += len(skipped)
        yield from _numbered_lines(stream, offset, shard.end)


def _numbered_lines(stream, offset: int, end: int | None) -> Iterator[tuple[int, int, bytes]]:
    for number, line in enumerate(stream, start=1):
        if end is not None and offset >= end:
            return
        yield number, offset, line.removesuffix(b"\n").removesuffix(b"\r")
        offset += len(line)


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
        try:
            # orjson decodes and parses in one go, ~3x as fast as json (the encode pass parses every
            # line again); what it refuses takes json's path, which tells the reason (and accepts
            # what json accepts beyond orjson: NaN, lone surrogates, integers past 64 bits).
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
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
    return _text_value(record[text_field], text_field, number, offset)


def _text_value(text, text_field: str, number: int, offset: int) -> tuple[int, str] | BadRecord:
    if not isinstance(text, str):
        return BadRecord(number, offset, "wrong_type", f"{text_field!r} is {type(text).__name__}: {repr(text)[:200]}")
    return number, text


# --- columnar formats -----------------------------------------------------------------------

class _NoColumn:
    """A record of a table that has no `text_field` column; `columns` names those it has."""

    def __init__(self, columns: list[str]):
        self.columns = columns


def _column_records(values, text_field: str) -> Iterator[tuple[int, str] | BadRecord]:
    for number, value in values:
        if isinstance(value, _NoColumn):
            yield BadRecord(number, -1, "missing_field", f"no {text_field!r} in columns {value.columns[:10]}")
        elif value is None:
            yield BadRecord(number, -1, "missing_field", f"{text_field!r} is null")
        else:
            yield _text_value(value, text_field, number, -1)


def _batch_values(batches, text_field: str) -> Iterator[tuple[int, object]]:
    """(record number, value of `text_field`) for each row of each record batch."""
    number = 0
    for batch in batches:
        if text_field in batch.schema.names:
            values = batch.column(text_field).to_pylist()
        else:
            values = [_NoColumn(batch.schema.names)] * batch.num_rows
        for value in values:
            number += 1
            yield number, value


def parquet_file(uri: str, storages: dict[str, Storage] | None = None):
    """The pyarrow ParquetFile of `uri` (reads the footer only); SourceError if it is not parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Column chunks stream page by page (pyarrow's default pre_buffer reads each one whole)
        return pq.ParquetFile(open_object(uri, storages=storages), buffer_size=_PARQUET_BUFFER_BYTES,
                              pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{uri}: not a readable parquet file ({e}); check the file or the source's format") from e


def _parquet_values(shard: Shard, text_field: str) -> Iterator[tuple[int, object]]:
    parquet = parquet_file(shard.uri)
    row_groups = list(range(shard.start, shard.end))
    if text_field not in parquet.schema_arrow.names:
        # no column to read: count the rows from the footer, every one lacks the field
        columns = _NoColumn(parquet.schema_arrow.names)
        num_rows = sum(parquet.metadata.row_group(i).num_rows for i in row_groups)
        yield from ((number, columns) for number in range(1, num_rows + 1))
        return
    yield from _batch_values(parquet.iter_batches(_BATCH_ROWS, row_groups=row_groups, columns=[text_field]),
                             text_field)


def _arrow_values(shard: Shard, text_field: str) -> Iterator[tuple[int, object]]:
    import pyarrow as pa

    with open_object(shard.uri) as stream:
        try:
            # `datasets` writes IPC streams; an IPC file (Feather v2) begins with ARROW1
            reader = pa.ipc.open_file(stream) if stream.peek(6)[:6] == b"ARROW1" else pa.ipc.open_stream(stream)
        except (pa.ArrowInvalid, OSError) as e:  # OSError: a truncated file
            raise SourceError(f"{shard.uri}: not a readable Arrow file ({e}); check the file or the source's "
                              "format") from e
        if isinstance(reader, pa.ipc.RecordBatchFileReader):
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        yield from _batch_values(batches, text_field)


def _json_records(shard: Shard, text_field: str) -> Iterator[tuple[int, str] | BadRecord]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="orchestrator-source-") as tmp:
        storage, key = split_uri(shard.uri)
        local = os.path.join(tmp, os.path.basename(key))
        storage.download_file(key, local)
        try:
            rows = list(datasets.load_dataset("json", data_files=local, split="train", streaming=True))
        except Exception:  # datasets cannot type this file: fall back to plain JSON per record
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
