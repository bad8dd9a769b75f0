"""What a run's data files were when its checkpoint was written, so that a resume on changed data
is refused instead of silently training on two data sets.

The files are those the task config names: every string of ``task.*`` that is an existing file, and
the files directly inside every existing directory it names (``task.data_dir``,
``task.data_files.train``, a fairseq ``data-bin``). Each is recorded by size and SHA-1 of its
content (the content, not the time: a copy or ``touch`` that keeps the bytes is the same data).

**(choice)** Bounds, so that a directory of images does not make every start slow: at most
:data:`MAX_FILES` files per directory and :data:`MAX_HASH_BYTES` bytes hashed per file; beyond
those, a file is recorded by its size only (and a directory beyond the count by its file count).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Mapping

MAX_FILES = 200
MAX_HASH_BYTES = 2 << 30


def _strings(node: Any) -> Iterator[str]:
    """Every string in ``node``, except under keys that name where we write (caches, outputs)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, Mapping):
        for key, value in node.items():
            if not any(word in str(key) for word in ("cache", "output")):
                yield from _strings(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _strings(value)


def _digest(path: Path) -> str | None:
    size = path.stat().st_size
    if size > MAX_HASH_BYTES:
        return None
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(task_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """{path: [size, sha1 or None]} of the data files ``task_cfg`` names ({} when it names none);
    a directory with more than MAX_FILES files: {dir: ["files", count]}."""
    out: dict[str, Any] = {}
    for text in _strings(task_cfg):
        if not text or text in (".", "..") or len(text) > 4096 or "\n" in text:
            continue
        path = Path(text).expanduser()
        try:
            if path.is_file():
                out[str(path.resolve())] = [path.stat().st_size, _digest(path)]
            elif path.is_dir():
                files = sorted(p for p in path.iterdir() if p.is_file())
                if len(files) > MAX_FILES:
                    out[str(path.resolve())] = ["files", len(files)]
                    continue
                for f in files:
                    out[str(f.resolve())] = [f.stat().st_size, _digest(f)]
        except OSError:  # unreadable now: the task's own loading says why
            continue
    return out


def changes(saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> list[str]:
    """The data files of ``saved`` (a checkpoint's record; None: an older checkpoint without one,
    nothing to compare) that are gone or differ ``now``, each as ``path (what changed)``. Files
    that appeared since are not counted (a directory may gain unrelated files)."""
    if not saved:
        return []
    out = []
    for path, before in saved.items():
        after = now.get(path)
        if after is None:
            out.append(f"{path} (gone)")
        elif list(after) != list(before):
            what = "file count" if before[0] == "files" else "size" if before[0] != after[0] else "content"
            out.append(f"{path} ({what} changed)")
    return out
