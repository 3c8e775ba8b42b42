"""The catalog: a SQL database (SQLite by default, any SQLAlchemy URL) describing the user's images."""

from handlens.data.catalog.db import Catalog, CatalogBusyError, open_catalog
from handlens.data.catalog.schema import (
    SCHEMA_VERSION,
    Annotation,
    Box,
    BoxLabel,
    Dataset,
    Image,
    ImportRecord,
    Job,
    Label,
    Labelset,
    Run,
    Split,
    SplitAssignment,
    Tag,
    UrlItem,
)

__all__ = [
    "SCHEMA_VERSION",
    "Annotation",
    "Box",
    "BoxLabel",
    "Catalog",
    "CatalogBusyError",
    "Dataset",
    "Image",
    "ImportRecord",
    "Job",
    "Label",
    "Labelset",
    "Run",
    "Split",
    "SplitAssignment",
    "Tag",
    "UrlItem",
    "open_catalog",
]
