"""``adaptune cache list|prune|clear``: the on-disk feature cache (tokenized splits shared by runs).

The cache lives in ``$ADAPTUNE_CACHE/features``, else ``${XDG_CACHE_HOME:-~/.cache}/adaptune/features``
(``--dir`` names another one, e.g. a run's ``task.feature_cache_dir``). It only grows by itself: a
new tokenizer, ``max_seq_length`` or data file adds an entry. ``prune`` removes damaged entries,
those not used for ``--older-than DAYS`` and then the least recently used until the rest fit in
``--max-size``; ``clear`` removes every entry. Both are safe while runs use the cache
(:mod:`adaptune.tasks.cache_entries`); ``--dry-run`` lists what they would remove.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from adaptune.common.errors import ConfigError
from adaptune.tasks import cache_entries as ce
from adaptune.tasks.feature_cache import cache_root


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts))


def _list(root: Path) -> int:
    found = ce.entries(root)
    if not found:
        print(f"{root}: no cached features")
        return 0
    print(f"{'key':<12} {'size':>10} {'rows':>9} {'max_len':>7}  {'last used':<16}  reader")
    for e in reversed(found):  # most recently used first
        reader = f"DAMAGED: {e.damaged}" if e.damaged else e.reader
        print(
            f"{e.key[:12]:<12} {ce.format_size(e.bytes):>10} {e.rows:>9,} {e.max_length:>7}  {_when(e.last_used):<16}  {reader}"
        )
    print(f"{len(found)} entries, {ce.format_size(sum(e.bytes for e in found))} in {root}")
    return 0


def _remove(root: Path, doomed: list[ce.Entry], dry_run: bool, verb: str) -> int:
    left = ce.debris(root)
    freed = sum(e.bytes for e in doomed)
    for e in doomed:
        print(
            f"{'would remove' if dry_run else 'removed'} {e.key[:12]} ({ce.format_size(e.bytes)}, last used {_when(e.last_used)})"
        )
        if not dry_run:
            ce.remove(root, e)
    if not dry_run:
        for p in left:
            shutil.rmtree(p, ignore_errors=True)
    kept = [e for e in ce.entries(root) if e not in doomed] if dry_run else ce.entries(root)
    done = "would free" if dry_run else "freed"
    print(
        f"{verb}: {len(doomed)} entries, {done} {ce.format_size(freed)}"
        + (f" and {len(left)} leftover build directories" if left else "")
        + f"; {len(kept)} entries ({ce.format_size(sum(e.bytes for e in kept))}) remain in {root}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="adaptune cache", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,prune,clear}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", help="the cache directory (default: $ADAPTUNE_CACHE/features or ~/.cache/adaptune/features)")
    sub.add_parser("list", parents=[common], help="the entries, most recently used first, and their total size")
    prune = sub.add_parser("prune", parents=[common], help="remove damaged, old and least recently used entries")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="remove entries not used for more than DAYS days")
    prune.add_argument("--max-size", metavar="SIZE", help="then remove the least recently used until the rest fit (e.g. 20G)")
    prune.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    clear = sub.add_parser("clear", parents=[common], help="remove every entry")
    clear.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    args = parser.parse_args(argv)
    root = cache_root(args.dir)
    try:
        if args.command == "list":
            return _list(root)
        if args.command == "clear":
            return _remove(root, ce.entries(root), args.dry_run, "clear")
        if args.older_than is None and args.max_size is None:
            raise ConfigError("prune needs --older-than DAYS and/or --max-size SIZE (damaged entries go either way)")
        if args.older_than is not None and args.older_than < 0:
            raise ConfigError(f"--older-than={args.older_than:g}: must be a number of days >= 0")
        max_bytes = None if args.max_size is None else ce.parse_size(args.max_size)
        older = None if args.older_than is None else args.older_than * 86400
        return _remove(root, ce.select(ce.entries(root), older, max_bytes), args.dry_run, "prune")
    except ConfigError as err:
        print(f"adaptune cache: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"adaptune cache: error: {root}: {err.strerror or err}", file=sys.stderr)
        return 1
