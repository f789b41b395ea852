"""Where numba keeps compiled kernels, keyed by the kernels' own source.

numba invalidates a cached function only when its own file changes, not when a function it
inlines from another file does, so a change to a block kernel would silently run stale machine
code. Keying the cache directory on a hash of every compiled source file (and the numba version)
rules that out, and keeping it under ~/.cache lets a fresh checkout reuse the compilation
(about a minute on a 2-core machine) instead of repeating it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

_PKG = Path(__file__).resolve().parent
#: Every file whose functions numba compiles or inlines.
JIT_SOURCES = ("kernels/_intrinsics.py", "kernels/blocks.py", "kernels/drivers.py",
               "kernels/bandwidth.py", "engine/ops.py")


def _digest() -> str:
    h = hashlib.sha256(numba.__version__.encode())
    for rel in JIT_SOURCES:
        h.update((_PKG / rel).read_bytes())
    return h.hexdigest()[:16]


def configure() -> None:
    """Point numba's cache at a directory private to this exact kernel source."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return  # the user chose a place
    base = Path(os.environ.get("PRIMA_CACHE", Path.home() / ".cache" / "prima"))
    numba.config.CACHE_DIR = str(base / "numba" / _digest())  # type: ignore[attr-defined]


configure()
