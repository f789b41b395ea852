"""Which model file a node holds, cheaply: every node must run the very same weights.

Hashing a 40 GB file would take minutes on a Pi; the fingerprint hashes the file's size, its
whole GGUF header (metadata and tensor table, so any change of model, quantisation or layout
shows) and 64 KiB samples spread evenly over the tensor data (so a truncated, re-quantised or
corrupted copy shows too). It is a fingerprint, not a proof against a deliberately forged file:
the cluster secret is what keeps strangers out.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

SAMPLES = 32
SAMPLE_BYTES = 64 * 1024
HEADER_CAP = 64 * 2**20


def fingerprint(path: str | os.PathLike[str]) -> str:
    p = Path(path).resolve()
    st = p.stat()
    return _fingerprint(str(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=8)
def _fingerprint(path: str, size: int, _mtime_ns: int) -> str:
    from ..model_file import ModelFile

    mf = ModelFile.open(path)
    try:
        data_start = min((t.offset for t in mf.tensors.values()), default=size)
    finally:
        mf.close()
    h = hashlib.sha256(f"prima-model-fingerprint/1 {size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(min(data_start, HEADER_CAP)))
        span = max(0, size - data_start - SAMPLE_BYTES)
        for i in range(SAMPLES):
            f.seek(data_start + span * i // max(1, SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:32]
