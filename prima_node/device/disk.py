"""Disk read speed of the filesystem holding the model, measured on cold data.

A device whose layers do not fit in memory re-reads them from disk every token, so the planner
needs what the disk delivers for this very file: sequential reads (Linux's readahead streams a
window's tensors) and random page reads (what macOS's mmap faults look like). The file's own
pages are dropped first with ``posix_fadvise(DONTNEED)``, never the machine's whole cache (other
programs share it); ``resident_fraction`` (``mincore``) says how cold the data really was, since
pages mapped by another process cannot be dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PAGE = mmap.PAGESIZE
SEQ_CHUNK = 1 << 20


@dataclass(frozen=True)
class DiskSpeed:
    sequential_bytes_per_s: float
    random_bytes_per_s: float  # page-sized reads at random offsets
    random_block: int
    bytes_read: int
    resident_before: float  # share of the file's pages in memory after dropping them
    path: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def drop_file_pages(fd: int) -> None:
    """Ask the kernel to forget this file's cached pages (Linux/BSD).

    Only clean pages can be dropped, so a file just written (a model copied a moment ago) is
    flushed first.
    """
    with contextlib.suppress(OSError, AttributeError):  # unsupported here: drop what we can
        os.fdatasync(fd)
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def resident_fraction(path: str | Path, start: int = 0, length: int | None = None) -> float:
    """Share of a byte range's pages that are in memory (``mincore``); 1.0 where unknown."""
    import numpy as np

    libc_name = ctypes.util.find_library("c")
    size = os.path.getsize(path)
    length = size - start if length is None else min(length, size - start)
    if libc_name is None or length <= 0:
        return 1.0
    libc = ctypes.CDLL(libc_name, use_errno=True)
    a = start - start % PAGE
    span = start + length - a
    n_pages = (span + PAGE - 1) // PAGE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)  # only for the mapping's address
        vec = (ctypes.c_ubyte * n_pages)()
        rc = libc.mincore(ctypes.c_void_p(view.ctypes.data + a), ctypes.c_size_t(span), vec)
        del view
        if rc != 0:
            return 1.0
        return sum(v & 1 for v in vec) / n_pages


def measure_disk(path: str | Path, *, seq_bytes: int = 256 << 20, random_reads: int = 512,
                 budget_s: float = 3.0, seed: int = 0) -> DiskSpeed:
    """Sequential then random reads of ``path`` on cold pages, each within ``budget_s``."""
    p = Path(path)
    size = p.stat().st_size
    if size < PAGE:
        raise ValueError(f"{p} is too small to measure a disk with ({size} bytes)")
    fd = os.open(p, os.O_RDONLY)
    try:
        drop_file_pages(fd)
        resident = resident_fraction(p)
        done, t0 = 0, time.perf_counter()
        while done < min(seq_bytes, size) and time.perf_counter() - t0 < budget_s:
            chunk = os.pread(fd, SEQ_CHUNK, done)
            if not chunk:
                break
            done += len(chunk)
        seq = done / max(time.perf_counter() - t0, 1e-9)
        drop_file_pages(fd)
        rng = random.Random(seed)
        pages = size // PAGE
        got, n, t0 = 0, 0, time.perf_counter()
        while n < random_reads and time.perf_counter() - t0 < budget_s:
            got += len(os.pread(fd, PAGE, rng.randrange(pages) * PAGE))
            n += 1
        rnd = got / max(time.perf_counter() - t0, 1e-9)
        drop_file_pages(fd)  # leave the file as cold as we found it: the node maps it later
    finally:
        os.close(fd)
    return DiskSpeed(sequential_bytes_per_s=seq, random_bytes_per_s=rnd, random_block=PAGE,
                     bytes_read=done + got, resident_before=resident, path=str(p))
