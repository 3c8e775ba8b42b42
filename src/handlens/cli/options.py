"""Options several commands share, as ``Annotated`` aliases, and the flag checks that go with them.

Choice lists come from the registries (backbones, trackers, explainers), so a new entry shows up in
``--help`` and in the error for a typo without touching the CLI. Nothing heavy is imported here:
``handlens --help`` must stay instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from handlens.core.errors import InputError


def backbone_names() -> list[str]:
    from handlens.models.backbones import BACKBONES

    return BACKBONES.names()


def tracking_names() -> list[str]:
    from handlens.track import TRACKERS

    return TRACKERS.names()


def explainer_names() -> list[str]:
    from handlens.explain.registry import EXPLAINERS

    return EXPLAINERS.names()


def check_choice(flag: str, value: str | None, names: list[str]) -> None:
    """Refuse ``value`` (when given) unless it is one of ``names``, listing them."""
    if value is not None and value not in names:
        raise InputError(f"{flag} {value!r}: choose one of {', '.join(names)}")


def parse_params(items: list[str] | None, *, method: str | None = None) -> dict[str, Any]:
    """``--param key=value`` (repeatable) -> ``{key: value}``, values read as YAML scalars (50 -> int). With
    ``method``, validated by that explainer's parameter model: a typo (``stpes=2``), a bad value or a key given
    twice is an error (exit 2), never a silent default; only the keys given are returned."""
    from handlens.train.config import parse_value

    params: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--param {item!r}: write key=value, e.g. --param steps=50")
        key, value = item.split("=", 1)
        if key in params:
            raise InputError(f"--param {key} is given twice; give it once")
        params[key] = parse_value(value)
    if method is None:
        return params
    from handlens.explain.registry import parse_params as validated

    return validated(method, params).model_dump(exclude_unset=True)


JSON_HELP = "Print one JSON document on stdout instead of tables."
JSON_OPTION = typer.Option(False, "--json", help=JSON_HELP)

# --------------------------------------------------------------------------- global options
WorkspaceOption = Annotated[Path | None, typer.Option(
    "--workspace", envvar="HANDLENS_WORKSPACE",
    help="Workspace directory (default ./handlens-workspace); created on first use.")]
DbOption = Annotated[str | None, typer.Option(
    "--db", envvar="HANDLENS_DB_URL",
    help="Catalog database URL (any SQLAlchemy URL; default: SQLite inside the workspace).")]

# --------------------------------------------------------------------------- every command
JsonFlag = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
DatasetArg = Annotated[str, typer.Argument(help="Dataset name.")]
BundleArg = Annotated[str, typer.Argument(help="Run id or bundle directory.")]
SeedOption = Annotated[int, typer.Option("--seed")]
TtaFlag = Annotated[bool, typer.Option("--tta", help="Average over the flips/right-angle turns the training "
                                       "policy allows (test-time augmentation).")]

# --------------------------------------------------------------------------- run configs (train, lr-find)
OverridesArg = Annotated[list[str] | None, typer.Argument(
    help="Config overrides: section.key=value, e.g. train.lr=0.01.")]
TrainDatasetOption = Annotated[str | None, typer.Option("--dataset", help="Dataset to train on.")]
LabelsetOption = Annotated[str | None, typer.Option("--labelset", help="Labelset (default: the split's).")]
SplitOption = Annotated[str | None, typer.Option("--split", help="Split name (default: the newest).")]
BackboneOption = Annotated[str | None, typer.Option(
    "--backbone", help="Backbone: " + ", ".join(backbone_names()) + " (default efficientnet_lite0).")]
WeightsOption = Annotated[str | None, typer.Option(
    "--weights", help="packaged (offline ImageNet, efficientnet_lite0), imagenet (download), none, or a "
    ".safetensors/.pth file (default packaged).")]
FreezeOption = Annotated[str | None, typer.Option("--freeze", help="frozen, partial:N or full (default frozen).")]
ConfigOption = Annotated[Path | None, typer.Option(
    "--config", help="Run config YAML; flags and key=value override it.")]

# --------------------------------------------------------------------------- explanations
MethodOption = Annotated[str, typer.Option("--method", help="Explanation method.")]


def flags_model(model: Any, **values: Any) -> Any:
    """``model(**values)`` for a command's flags: a validation error becomes one :class:`InputError` naming each
    flag (``--max-minutes: ...``), not a traceback."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as exc:
        raise InputError("; ".join(f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
                                   for e in exc.errors())) from None
