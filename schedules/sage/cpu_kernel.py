"""Build and load the multi-tensor SAGE kernels for CPU (``csrc/sage_cpu.cpp``).

The kernels are compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and
ninja; the ``ninja`` wheel is a dependency) and cached by torch under ``TORCH_EXTENSIONS_DIR``
(default ``~/.cache/torch_extensions``), so the build happens once per machine and source
version; later processes load the cached library. Concurrent processes
(a sweep) wait on torch's build lock rather than building twice.

**(choice)** The code is built with ``-march=native``: the update is memory-bound only once it
is vectorised with the machine's widest vectors (baseline x86-64 SSE2 is markedly slower; see
docs/benchmarks.md). So that a home directory shared by different machines (a cluster) never loads a
library built for another CPU, the extension's name carries a hash of the CPU's model and
feature flags.

Where the build fails (no compiler, a read-only cache), :func:`kernels` logs one warning and
returns None, and SAGE falls back to its other implementations (the compiled backend of
:mod:`adaptune.schedules.sage.compiled`, then the reference loop).

The kernel's module state (the loaded library, or why it failed) lives here, once per process.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "sage_cpu.cpp"
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp"]

_lock = threading.Lock()
_module: ModuleType | None = None
_failed: str | None = None


def _cpu_tag() -> str:
    """A short hash of what the compiled code depends on: the CPU model and its feature flags."""
    info = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.split(":", 1)[0].strip()
            if key in ("model name", "flags", "Features", "CPU part"):
                info += "\n" + line
                if key in ("flags", "Features"):
                    break
    except OSError:
        info += platform.processor()
    return hashlib.sha1((info + " ".join(CFLAGS)).encode()).hexdigest()[:10]


def _ensure_ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; a venv used without activation lacks it there."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass


def _gist(message: str) -> str:
    """The telling line of a build error: the first that names an error, else the last one."""
    lines = [line.strip() for line in message.splitlines() if line.strip()] or [""]
    telling = [
        line
        for line in lines
        if any(w in line.lower() for w in ("error", "not found", "no such")) and not line.startswith("Error building extension")
    ]
    return (telling or lines)[0 if telling else -1][:300]


def kernels() -> ModuleType | None:
    """The compiled kernel module (built on first use), or None where it cannot be built."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is not None or _failed is not None:
            return _module
        # importing cpp_extension on a CUDA build of torch without a GPU logs a CUDA_HOME warning
        # that does not concern a CPU-only extension
        cpp_log = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_log.level
        cpp_log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension

            _ensure_ninja_on_path()
            name = f"adaptune_sage_cpu_{_cpu_tag()}"
            build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
            if not any(build_dir.glob("*.so")):
                log.info("SAGE: building the CPU kernel %s (once per machine, ~30 s) in %s", SOURCE.name, build_dir)
            _module = cpp_extension.load(
                name=name,
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                build_directory=str(build_dir),
                with_cuda=False,
                verbose=False,
            )
        except Exception as err:  # no compiler or ninja, build error, unwritable cache, ...
            _failed = f"{type(err).__name__}: {_gist(str(err))}"
            log.warning("SAGE: could not build the CPU kernel (%s); using the other implementations", _failed)
        finally:
            cpp_log.setLevel(level)
    return _module


def failure() -> str | None:
    """Why :func:`kernels` returned None (None if it has not failed)."""
    return _failed
