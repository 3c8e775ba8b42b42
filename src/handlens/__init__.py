"""handlens: a workbench for small, expert-labelled image collections.

Importing this package is cheap: nothing heavy (torch, timm, Lightning) is imported until a
function that needs it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from handlens.explain.api import ExplainableBundle


def load_bundle(path: Any) -> ExplainableBundle:
    """Load a model bundle directory: ``.classes``, ``.module``, ``.transform``, ``.layer_names``,
    ``.layer(name)``, ``.predict(images, top_k=...)`` and ``.explain(images, method=..., layer=..., target=...)``."""
    from handlens.explain.api import load_bundle as _load

    return _load(path)


__all__ = ["__version__", "load_bundle"]
