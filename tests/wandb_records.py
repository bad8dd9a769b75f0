"""Read back what W&B wrote offline: a minimal reader of the ``.wandb`` transaction log.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
of records, each with a 7-byte header (crc32, length, type: full/first/middle/last) carrying a
serialised ``wandb.proto.wandb_internal_pb2.Record``.

W&B writes the file from its own service process, which may still be writing when ``run.finish()``
has returned: call :func:`closed_run` (it shuts the service down first, ``wandb.teardown()``, so
the file is complete) rather than reading a live file. A log without the run's ``exit`` record is
refused, never read half.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7


def _payloads(path: Path):
    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B log"
    pos, pending = 7, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += left  # zero padding up to the block end
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def closed_run(path: Path) -> dict:
    """:func:`read_run` after W&B's service has flushed and closed every file it writes."""
    import wandb

    wandb.teardown()
    return read_run(path)


def read_run(path: Path) -> dict:
    """{"run": {group, tags, job_type}, "history": [{key: value}], "summary": {key: value}} of a
    finished run's log; AssertionError if the log has no ``exit`` record (still being written)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = {"run": {}, "history": [], "summary": {}}
    exited = False
    for payload in _payloads(path):
        record = pb.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"group": record.run.run_group, "tags": list(record.run.tags), "job_type": record.run.job_type}
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for i in record.summary.update:
                out["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "exit":
            exited = True
    assert exited, f"{path} has no exit record: the run is not finished or W&B is still writing it"
    return out
