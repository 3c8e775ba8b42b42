"""The HTTP service: a FastAPI app over the catalog, model bundles and explanations.

``create_app(settings)`` builds it; nothing is created at import. Heavy modules (torch, FastAPI) are
imported inside, so ``handlens --help`` stays light.
"""

from __future__ import annotations

from typing import Any


def create_app(settings: Any = None) -> Any:
    from handlens.serve.app import create_app as _create

    return _create(settings)
