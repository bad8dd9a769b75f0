"""The feature cache's entries on disk, for ``adaptune cache``: list them, and remove them by age,
by total size (least recently used first) or all at once.

An entry is a ``<key>/`` directory holding ``features.arrow`` and ``info.json``
(:mod:`adaptune.tasks.feature_cache`). **Last use** is the modification time of its ``info.json``,
which every run that maps the entry touches (:func:`adaptune.tasks.feature_cache.mark_used`;
entries of a read-only cache keep their creation time).

Removal is safe while runs use the cache: an entry is renamed aside under the key's build lock and
then deleted, so a run never opens half a directory. A run that already mapped the file keeps
reading it (POSIX keeps a mapped file until it is unmapped); a run that looks the entry up
afterwards tokenizes it again. Temporary directories of builds in progress are kept; those of
killed builds (older than a day) and damaged entries are removed by ``prune`` and ``clear``.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from adaptune.common.errors import ConfigError

from .feature_cache import FILE, FORMAT_VERSION, INFO, _locked, discard, stale_builds

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class Entry:
    """One directory of the cache: a complete entry, or debris (a damaged entry, a killed build)."""

    path: Path
    bytes: int
    last_used: float
    reader: str = ""
    rows: int = 0
    max_length: int = 0
    damaged: str = ""  # why it is not a readable entry; "" for a complete one

    @property
    def key(self) -> str:
        return self.path.name


def parse_size(text: str) -> int:
    """Bytes from ``"500M"``, ``"1.5G"``, ``"2GB"``, ``"10GiB"`` or a plain number of bytes (ConfigError
    otherwise)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
    if not match:
        raise ConfigError(f"--max-size={text}: not a size; e.g. 500M, 20G or a number of bytes")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _read(path: Path) -> Entry:
    size = _size(path)
    try:
        stat = (path / INFO).stat()
        info = json.loads((path / INFO).read_text())
        file_bytes = (path / FILE).stat().st_size
    except (OSError, ValueError) as err:
        mtime = path.stat().st_mtime if path.exists() else 0.0
        return Entry(path, size, mtime, damaged=f"unreadable ({type(err).__name__})")
    damaged = ""
    if info.get("format") != FORMAT_VERSION:
        damaged = f"format {info.get('format')} (this version reads {FORMAT_VERSION})"
    elif file_bytes != info.get("bytes"):
        damaged = f"{FILE} has {file_bytes} bytes, {info.get('bytes')} were written"
    return Entry(
        path,
        size,
        stat.st_mtime,
        reader=str(info.get("reader", "")),
        rows=int(info.get("rows", 0)),
        max_length=int(info.get("max_length", 0)),
        damaged=damaged,
    )


def entries(root: Path) -> list[Entry]:
    """The cache's entries (damaged ones included), least recently used first; [] without a cache."""
    if not root.is_dir():
        return []
    found = [_read(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=lambda e: (e.last_used, e.key))


def debris(root: Path) -> list[Path]:
    """Temporary directories of killed builds (older than a day) and entries set aside but not deleted."""
    if not root.is_dir():
        return []
    aside = [p for p in root.iterdir() if p.name.startswith((".damaged-", ".removing-"))]
    return aside + stale_builds(root)


def remove(root: Path, entry: Entry) -> None:
    """Remove ``entry`` under its key's build lock (renamed aside, then deleted), and its lock file."""
    with _locked(root / ".locks" / entry.key):
        discard(entry.path, ".removing-")
    # (a build that opened the lock file before the unlink and one that creates it anew may then
    # both tokenize that key: the second rename finds the first's entry and drops its own copy)
    try:
        (root / ".locks" / entry.key).unlink()
    except OSError:
        pass


def select(found: list[Entry], older_than_s: float | None, max_bytes: int | None, now: float | None = None) -> list[Entry]:
    """The entries ``prune`` removes: damaged ones, those unused for more than ``older_than_s``, then
    the least recently used until the rest fit in ``max_bytes``."""
    now = time.time() if now is None else now
    doomed = [e for e in found if e.damaged or (older_than_s is not None and now - e.last_used > older_than_s)]
    if max_bytes is not None:
        kept = [e for e in found if e not in doomed]  # least recently used first
        total = sum(e.bytes for e in kept)
        for e in kept:
            if total <= max_bytes:
                break
            doomed.append(e)
            total -= e.bytes
    return doomed
