"""The OpenAPI 3.1 description of the head's API (``GET /openapi.json``)."""

from __future__ import annotations

from typing import Any


def openapi_document() -> dict[str, Any]:
    return {"openapi": "3.1.0", "info": {"title": "Prima Home Cluster head API",
                                         "version": "1"}, "paths": {}}
