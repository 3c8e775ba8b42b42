"""Names that tell runs apart: the one the user gave (``train --name``), else what differs between them.

Six runs listed as "efficientnet_lite0 · frozen" help nobody choose. When the user named a run, that name
is used; otherwise a run is described by the settings whose values differ among the runs shown with it
(e.g. ``pool=gem · size=320 · epochs=20``), and a study's winner by its study and trial.
"""

from __future__ import annotations

from typing import Any

#: settings never worth naming a run by (they differ between every run, or say nothing about the model)
IGNORED = ("tracking.", "train.progress", "train.workers", "train.loader_workers", "data.split_resolved")
#: at most this many differing settings in a description
MOST = 3
#: settings named first when several differ (what users compare), in this order
FIRST = ("model.backbone", "model.freeze", "model.pool", "preprocess.size", "preprocess.resize", "train.epochs",
         "train.lr", "augment.policy")


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"pool": "gem"}}`` -> ``{"model.pool": "gem"}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(key: str) -> str:
    return key.split(".")[-1]


def run_names(configs: dict[str, dict[str, Any]], studies: dict[str, dict[str, Any]] | None = None) -> dict[str, str]:
    """A display name for each run id of ``configs`` (each run's config as saved in its bundle); ``studies``:
    the ``study`` section of a bundle that a study refitted, by run id."""
    flat = {run: {k: v for k, v in flatten(cfg or {}).items() if not k.startswith(IGNORED)}
            for run, cfg in configs.items()}
    keys = sorted({k for values in flat.values() for k in values})
    differing = [k for k in keys if len({repr(values.get(k)) for values in flat.values()}) > 1]
    ordered = [k for k in FIRST if k in differing] + [k for k in differing if k not in FIRST]
    out = {}
    for run, cfg in configs.items():
        given = str(((cfg or {}).get("tracking") or {}).get("name") or "")
        study = (studies or {}).get(run)
        if given:
            out[run] = given
        elif study:
            out[run] = f"study {study.get('name')} · trial {study.get('trial')}"
        elif ordered:
            out[run] = " · ".join(f"{_short(k)}={flat[run].get(k)}" for k in ordered[:MOST])
        else:
            out[run] = run
    return out
