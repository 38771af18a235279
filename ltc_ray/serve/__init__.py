"""Browse results in a web page: ``ltc-ray serve`` (FastAPI on uvicorn, the ``ui`` extra).

``create_app`` (``ltc_ray.serve.app``) builds the app; importing this package loads
neither FastAPI nor uvicorn, so the rest of ltc-ray works without the extra.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from ltc_ray.serve.app import create_app

        return create_app
    raise AttributeError(name)
