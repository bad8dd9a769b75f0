"""Run-directory names: deterministic (no timestamps), so re-running a command finds its runs."""

from __future__ import annotations

import hashlib
import re


def dirname(overrides: str) -> str:
    """A run-directory name from Hydra's override string: '/' and odd characters become '_';
    names over 120 characters keep their start plus a hash of the whole (file-name limits)."""
    name = re.sub(r"[^A-Za-z0-9=,._+-]+", "_", overrides).strip("_")
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name or "default"
