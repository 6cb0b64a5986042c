"""Reads what W&B wrote for an offline run: the run's `.wandb` file, W&B's transaction log, is a
LevelDB log (a 7-byte `:W&B` header, then 32 KiB blocks of chunks with a 7-byte header: CRC,
length, type) whose records are W&B's own protobuf `Record`s. wandb 0.19+ dropped its Python
reader (wandb-core, in Go, reads it), so the tests parse it here, with wandb's protobuf classes."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

_BLOCK = 32 * 1024
_HEADER = struct.Struct("<IHB")  # crc32c, length, chunk type
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    run_id: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    exit_code: int | None = None


def read_offline_run(path: str) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run = OfflineRun()
    for data in _chunks(path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.tags = record.run.run_id, list(record.run.tags)
            run.config.update(_items(record.run.config.update))
        elif kind == "config":
            run.config.update(_items(record.config.update))
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary.update(_items(record.summary.update))
        elif kind == "files":
            run.files += [f.path for f in record.files.files]
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def _chunks(path: str):
    with open(path, "rb") as f:
        data = f.read()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + _HEADER.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER.size:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = _HEADER.unpack_from(data, pos)
        chunk, pos = data[pos + _HEADER.size:pos + _HEADER.size + length], pos + _HEADER.size + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
        elif kind == 0:  # zero padding up to the block's end
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
