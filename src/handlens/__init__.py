"""handlens: a workbench for small, expert-labelled image collections.

Importing this package is cheap: nothing heavy (torch, timm, Lightning) is imported until a
function that needs it runs.
"""

__version__ = "0.1.0"
