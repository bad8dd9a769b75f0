"""One writer per run directory: a lock held for the run's whole life.

``run_dir/.lock`` is locked with ``flock`` (exclusive, non-blocking). The kernel releases it when
its process ends in any way, ``kill -9`` included, so a lock is never stale and a killed run
resumes at once. A second process on the same directory (the same command started twice, a
re-queued array job while the first still runs) gets :class:`RunLocked` at once: one line naming
the directory and the holder's pid, host and start time (written into the file by the holder).
Under DDP only rank 0 takes it (every rank of one run shares the directory).

(choice) Where ``fcntl`` does not exist (Windows) runs are not locked. On network file systems
``flock`` is as reliable as the file system's own locking (NFSv4: yes).
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from adaptune.common.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX
    fcntl = None

LOCK = ".lock"


class RunLocked(ConfigError):
    """Another process is training in this run directory."""


@contextmanager
def run_lock(run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the ``with`` block, or raise :class:`RunLocked`."""
    if not enabled or fcntl is None:
        yield
        return
    path = Path(run_dir) / LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # e.g. a read-only output directory: one line, not a traceback
        from .checkpoint import WriteFailed, describe_os_error

        raise WriteFailed(path, describe_os_error(err)) from err
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise RunLocked(
                f"{run_dir} is in use by {holder}: one writer per run directory; wait for it "
                "to finish, or train elsewhere (another name= or hydra.run.dir=)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (deleting it would race a new holder)
