"""The image files handlens reads, by extension and by the format Pillow names from their content: one list,
at the bottom of the package layers, for import (data), bundles (models) and the service."""

from __future__ import annotations

#: Common in the domains we serve but not decodable here: reported as unsupported, with a fix.
UNDECODABLE_EXTENSIONS = frozenset(
    {".heic", ".heif", ".avif", ".jxl", ".dcm", ".dicom", ".jp2", ".j2k", ".svs", ".ndpi", ".czi"}
)
#: Extensions the folder scan treats as images. Files with these extensions that fail to decode are
#: reported; other files are ignored (and counted).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".ppm", ".pgm", ".pbm", ".pnm"}
) | UNDECODABLE_EXTENSIONS
#: Formats (as Pillow names them) that the rest of handlens reads.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF", "PPM", "MPO"})
