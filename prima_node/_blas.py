"""Choose OpenBLAS's AVX-512 kernels on CPUs its detection under-rates.

OpenBLAS's runtime CPU detection maps recent AMD cores (Zen 4/5), which have full AVX-512, to its
AVX2 "Haswell" kernels; its SkylakeX kernels run the prefill GEMM twice as fast there (measured
178 -> 340 GFLOP/s on 2 Zen 5 cores). OpenBLAS reads the choice from OPENBLAS_CORETYPE when it
loads, so this must run before numpy is first imported; a user's own setting always wins.
"""

from __future__ import annotations

import os
import sys

#: The AVX-512 subsets OpenBLAS's SkylakeX kernels use.
_SKYLAKEX_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def prefer_avx512_blas() -> None:
    if "numpy" in sys.modules or "OPENBLAS_CORETYPE" in os.environ:
        return
    if _cpu_flags() >= _SKYLAKEX_FLAGS:
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
