"""Atomic checkpoint files that load with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain containers (numbers, strings, lists, dicts), so the
safe loader reads it back. Writes go to a temporary file in the same directory, are flushed to
disk, then renamed over the target: an interruption leaves either the old or the new file.

Faults a user can fix end in one line, never a traceback:

- **A write that fails** (disk full, a file-size limit, no permission, a read-only file system)
  raises :class:`WriteFailed` naming the file and the reason; the temporary file is removed and
  the previous version of the target is untouched.
- **A damaged checkpoint** (truncated by an interrupted copy, a disk error, a sync tool): the
  loop keeps the checkpoint before ``last.pt`` as ``previous.pt`` (:func:`save_rotating`: the new
  file is written, synced and checked before the old one is moved aside), and
  :func:`resume_candidate` picks the newest intact one, setting a damaged ``last.pt`` aside as
  ``last.pt.damaged`` with a one-line warning. (choice) Two checkpoints on disk instead of one:
  the price of never losing a run to one bad file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from adaptune.common.errors import ConfigError

LAST = "last.pt"
PREVIOUS = "previous.pt"
BEST = "best.pt"
DAMAGED_SUFFIX = ".damaged"

log = logging.getLogger("adaptune")

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (a file-size limit, e.g. ulimit -f)",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (a disk or network file system fault)",
}


class WriteFailed(ConfigError):
    """A file could not be written; the message names it and why. The target's previous version
    (if any) is intact."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"could not write {path}: {reason}")
        self.path, self.reason = Path(path), reason


def describe_os_error(err: BaseException) -> str:
    """The reason of a failed write in words (no space, file too large, permission, ...)."""
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno in _REASONS and err.strerror in (None, os.strerror(err.errno)):
            return _REASONS[err.errno]
        return err.strerror or str(err)
    return str(err).splitlines()[0] if str(err) else type(err).__name__


class _TrackedFile:
    """A binary file that remembers the first OSError its writes raised: torch.save turns it
    into a RuntimeError without the errno ("unexpected pos ...")."""

    def __init__(self, f: BinaryIO):
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self._f.flush()

    def __getattr__(self, name):
        return getattr(self._f, name)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], before_replace: Callable[[Path], None] | None = None) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, sync it, (``before_replace(tmp)``,)
    rename it over ``path``. A failing write raises :class:`WriteFailed` (one line: the file and
    why) and leaves ``path`` as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            tracked = _TrackedFile(f)
            try:
                write(tracked)
            except RuntimeError as err:  # torch.save hides the OSError of a failed write
                if tracked.error is None:
                    raise
                raise tracked.error from err
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
    except OSError as err:
        raise WriteFailed(path, describe_os_error(err)) from err
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_save_json(data: dict, path: Path) -> None:
    """JSON (e.g. results.json) atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(data, indent=2, default=str).encode()))


def load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


#: what a training checkpoint (last.pt / previous.pt) holds; best.pt holds "model" (+ step, metrics)
RESUME_KEYS = ("model", "optimizer", "lr_scheduler", "schedule", "rng", "state")


def incompatible(path: Path, data: Any, keys: tuple[str, ...] = RESUME_KEYS) -> ConfigError | None:
    """A one-line error when ``data`` (loaded from ``path``) lacks keys this version needs: a
    checkpoint written by an older (or another) program; None when it has them all."""
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if not missing:
        return None
    return ConfigError(
        f"{path} was written by another version of adaptune (it has no {', '.join(missing)}); "
        "pass resume=false to start over in that directory, or use the version that wrote it"
    )


def load_weights(model: torch.nn.Module, data: Any, path: Path) -> None:
    """``model.load_state_dict(data["model"])``, or a one-line ConfigError when the checkpoint at
    ``path`` does not fit the model (another architecture or ``task.model.*``, another version)."""
    err = incompatible(path, data, ("model",))
    if err is not None:
        raise err
    try:
        model.load_state_dict(data["model"])
    except RuntimeError as exc:  # missing / unexpected keys, shape mismatches
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0] if lines else "state_dict mismatch"
        raise ConfigError(
            f"{path} does not fit the model the run's config builds ({detail[:200]}); "
            "was it written with other task.model.* settings or by another version?"
        ) from None


def peek(path: Path) -> Any:
    """A checkpoint's contents, memory-mapped (the tensor bytes are not read); a file that is not
    in torch's zip format (mmap unsupported) is loaded whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError):
        return torch.load(path, map_location="cpu", weights_only=True)


def damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be read (one phrase), or None if it reads: its zip
    directory and its record of tensors load (memory-mapped: the tensor bytes are not read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "not a torch checkpoint"
        peek(path)
    except (OSError, RuntimeError, ValueError, EOFError, zipfile.BadZipFile) as err:
        return str(err).splitlines()[0][:120] if str(err) else type(err).__name__
    except Exception as err:  # noqa: BLE001 - an unpickling error of any kind means unreadable
        return f"{type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}"
    return None


def _check_written(tmp: Path) -> None:
    """The just-written file reads back as a checkpoint (else the old files stay in place)."""
    reason = damage(tmp)
    if reason is not None:
        raise OSError(errno.EIO, f"the written file does not read back ({reason})")


def save_rotating(obj: Any, ckpt_dir: Path) -> Path:
    """Write ``ckpt_dir/last.pt`` keeping the one before as ``previous.pt``: the new file is
    written, synced and checked to read back before ``last.pt`` is moved to ``previous.pt`` and
    the new file takes its place. An interruption between the two renames leaves ``previous.pt``
    (the newest intact one) and no ``last.pt``, which :func:`resume_candidate` handles."""
    ckpt_dir = Path(ckpt_dir)
    last = ckpt_dir / LAST

    def rotate(tmp: Path) -> None:
        _check_written(tmp)
        if last.is_file():
            os.replace(last, ckpt_dir / PREVIOUS)

    atomic_write(last, lambda f: torch.save(obj, f), before_replace=rotate)
    return last


def saved_step(path: Path) -> int | None:
    """The training step a readable checkpoint was written at (None if it has none)."""
    data = peek(path)
    state = data.get("state") if isinstance(data, dict) else None
    return state.get("step") if isinstance(state, dict) else None


def resume_candidate(ckpt_dir: Path, main_process: bool = True) -> Path | None:
    """The newest intact checkpoint of ``ckpt_dir`` (``last.pt``, else ``previous.pt``), or None
    when there is none at all. A damaged ``last.pt`` is reported in one line and (by the main
    process) renamed to ``last.pt.damaged``, so that the next save cannot rotate it over the intact
    ``previous.pt``. When checkpoints exist but none reads, :class:`ConfigError` names the file
    and the way out; nothing is overwritten."""
    ckpt_dir = Path(ckpt_dir)
    last, previous = ckpt_dir / LAST, ckpt_dir / PREVIOUS
    broken = damage(last) if last.is_file() else None
    if last.is_file() and broken is None:
        return last
    if previous.is_file() and damage(previous) is None:
        if broken is not None:
            kept = last.with_name(last.name + DAMAGED_SUFFIX)
            if main_process:
                os.replace(last, kept)
            log.warning(
                "%s is damaged (%s); kept as %s, resuming from %s (step %s)",
                last,
                broken,
                kept.name,
                previous,
                saved_step(previous),
            )
        return previous
    if broken is not None:
        raise ConfigError(
            f"{last} is damaged ({broken}) and no intact earlier checkpoint is beside it; "
            "pass resume=false to start this run over (that replaces the damaged file)"
        )
    if previous.is_file():  # (damaged: the intact case returned above)
        raise ConfigError(
            f"{previous} is damaged ({damage(previous)}) and there is no {LAST}; pass resume=false to start this run over"
        )
    return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
