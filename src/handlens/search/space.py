"""A study's search space: YAML over any run-config key, checked against the run config before any trial runs.

```yaml
space:                      # key -> choices (a list) or a distribution
  model.pool: [avg, texture]
  train.lr: {float: [1.0e-4, 1.0e-2], log: true}
  train.epochs: {int: [4, 12], step: 4}
fixed:                      # run-config keys every trial shares
  model.freeze: frozen
```

Every key is a dotted run-config key (``section.key`` or ``preprocess.patches.size``); an unknown key
or a value the run config refuses is one error naming the key, with a did-you-mean.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from handlens.core.errors import InputError

PRESETS_DIR = Path(__file__).parent / "presets"
PRESETS = ("quick", "thorough")


@dataclass(frozen=True)
class Param:
    """One searched run-config key: categorical choices, or an int/float range (log or linear)."""

    key: str
    kind: str  # categorical, int, float
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)

    def grid_values(self) -> list[Any]:
        """The values a grid search tries: the choices, or every step of an int range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.kind == "float" and self.step:
            count = round((self.high - self.low) / self.step) + 1
            return [round(self.low + i * self.step, 12) for i in range(count)]
        raise InputError(f"search space key {self.key!r}: a grid search needs a list of choices or a stepped "
                         "range; give a list, add step:, or use --sampler random|tpe|gp")

    def samples(self) -> list[Any]:
        """Values that stand for the whole range when checking the space against the run config."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "categorical":
            return {"key": self.key, "choices": list(self.choices)}
        out: dict[str, Any] = {"key": self.key, self.kind: [self.low, self.high], "log": self.log}
        if self.step:
            out["step"] = self.step
        return out


@dataclass
class SearchSpace:
    params: list[Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def grid(self) -> list[dict[str, Any]]:
        """Every point of the grid, in a stable order."""
        names = self.keys
        return [dict(zip(names, values, strict=True))
                for values in itertools.product(*(p.grid_values() for p in self.params))]

    def grid_size(self) -> int | None:
        try:
            return math.prod(len(p.grid_values()) for p in self.params)
        except InputError:
            return None

    def to_dict(self) -> dict[str, Any]:
        return {"params": [p.to_dict() for p in self.params], "fixed": self.fixed, "source": self.source}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        params = []
        for item in data["params"]:
            if "choices" in item:
                params.append(Param(item["key"], "categorical", tuple(item["choices"])))
            else:
                kind = "int" if "int" in item else "float"
                low, high = item[kind]
                params.append(Param(item["key"], kind, low=low, high=high, log=bool(item.get("log")),
                                    step=item.get("step")))
        return cls(params, dict(data.get("fixed") or {}), data.get("source", ""))


def load_space(path: str | Path | None = None, *, preset: str | None = None) -> SearchSpace:
    """A search space from a YAML file or a shipped preset (``quick``, ``thorough``)."""
    if (path is None) == (preset is None):
        raise InputError("give a search space: --space FILE.yaml or --preset quick|thorough (one of them)")
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"--preset {preset!r}: choose one of {', '.join(PRESETS)}")
        path = PRESETS_DIR / f"{preset}.yaml"
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"cannot read search space {path}: {exc}") from exc
    return parse_space(data, source=preset or str(path))


def parse_space(data: Any, *, source: str = "") -> SearchSpace:
    """Parse and check a space mapping (``space:`` and optional ``fixed:``)."""
    sections = ("space", "fixed", "description")
    unknown = sorted(str(key) for key in set(data) - set(sections)) if isinstance(data, dict) else []
    if unknown:  # before the 'space:' check, so that a misspelt 'spcae:' is named as such
        close = [difflib.get_close_matches(key, sections, 1) for key in unknown]
        hints = [f"{key!r}" + (f" (did you mean {c[0]!r}?)" if c else "")
                 for key, c in zip(unknown, close, strict=True)]
        raise InputError(f"search space {source}: unknown section(s) {', '.join(hints)}; use space, fixed")
    if not isinstance(data, dict) or not isinstance(data.get("space"), dict) or not data["space"]:
        raise InputError(f"search space {source}: write a mapping with a non-empty 'space:' section of "
                         "key: [choices] or key: {float|int: [low, high], log: true}")
    params = [_param(str(key), spec) for key, spec in data["space"].items()]
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise InputError(f"search space {source}: 'fixed:' must map run-config keys to values")
    both = sorted(set(fixed) & {p.key for p in params})
    if both:
        raise InputError(f"search space {source}: {', '.join(both)} is both searched and fixed; keep one")
    space = SearchSpace(params, {str(k): v for k, v in fixed.items()}, source)
    check_space(space)
    return space


def _param(key: str, spec: Any) -> Param:
    where = f"search space key {key!r}"
    if isinstance(spec, list):
        if not spec:
            raise InputError(f"{where}: the list of choices is empty")
        return Param(key, "categorical", tuple(spec))
    if not isinstance(spec, dict):
        return Param(key, "categorical", (spec,))
    kinds = [k for k in ("categorical", "choices", "int", "float") if k in spec]
    extra = sorted(set(spec) - {"categorical", "choices", "int", "float", "log", "step"})
    if len(kinds) != 1 or extra:
        raise InputError(f"{where}: write [choices], {{float: [low, high], log: true}} or {{int: [low, high], "
                         f"step: N}}" + (f"; unknown field(s) {', '.join(extra)}" if extra else ""))
    kind = kinds[0]
    if kind in ("categorical", "choices"):
        choices = spec[kind]
        if not isinstance(choices, list) or not choices:
            raise InputError(f"{where}: {kind} needs a non-empty list")
        return Param(key, "categorical", tuple(choices))
    bounds = spec[kind]
    if (not isinstance(bounds, list) or len(bounds) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds)):
        raise InputError(f"{where}: {kind} needs [low, high] numbers, e.g. {{{kind}: [1, 10]}}")
    low, high = bounds
    log, step = bool(spec.get("log", False)), spec.get("step")
    if low >= high:
        raise InputError(f"{where}: low {low} must be below high {high}")
    if log and low <= 0:
        raise InputError(f"{where}: a log range needs low > 0 (got {low})")
    if log and step:
        raise InputError(f"{where}: log and step cannot be combined")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise InputError(f"{where}: int bounds must be whole numbers")
    if step is not None and (not isinstance(step, (int, float)) or step <= 0):
        raise InputError(f"{where}: step must be a positive number")
    if step is not None and low + step > high:  # the range would hold its low end alone: one value searched
        raise InputError(f"{where}: step {step} is wider than the range [{low}, {high}], so only {low} would be "
                         f"tried; use a step of at most {high - low} or list the value(s)")
    return Param(key, kind, low=low, high=high, log=log, step=step)


def set_key(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set a dotted run-config key in a nested dict (in place; returns it)."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"search space key {key!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value
    return data


def check_space(space: SearchSpace) -> None:
    """Each key and each sample value must be one the run config accepts (before any trial runs)."""
    from handlens.train.config import RunConfig, _explain_error

    base: dict[str, Any] = {}
    for key, value in space.fixed.items():
        _require_dotted(key)
        set_key(base, key, value)
    for param in [None, *space.params]:
        values = [None] if param is None else param.samples()
        for value in values:
            data = copy.deepcopy(base)
            if param is not None:
                _require_dotted(param.key)
                set_key(data, param.key, value)
            try:
                RunConfig.model_validate(data)
            except ValidationError as exc:
                problem = "; ".join(_explain_error(e) for e in exc.errors())
                where = f"search space key {param.key!r} = {value!r}" if param else "search space 'fixed:'"
                raise InputError(f"{where}: {problem}") from None


def _require_dotted(key: str) -> None:
    if "." not in key:
        raise InputError(f"search space key {key!r}: write a run-config key as section.key, e.g. train.lr "
                         "or model.freeze")
