"""Validated configuration: pydantic models that reject unknown keys, and YAML loading with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from medsynth.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every medsynth config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One readable line per problem, naming the dotted key and, for unknown keys, the allowed ones."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, e["loc"][:-1])
            lines.append(f"{source}: unknown key '{loc}'; allowed keys: {', '.join(allowed)}")
        else:
            lines.append(f"{source}: key '{loc}': {e['msg']}")
    return "; ".join(lines)


def _allowed_keys(model: type[BaseModel], parent: tuple) -> list[str]:
    cur: Any = model
    for part in parent:
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cur is None:
            # unions / discriminated families: report nothing rather than guess
            return []
    return sorted(getattr(cur, "model_fields", {}))


def validate(model: type[M], data: Any, source: str = "config") -> M:
    """Validate ``data`` (a mapping) into ``model``; raise :class:`ConfigError` naming the bad keys."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file; raise :class:`ConfigError` naming the file on a missing, unreadable, non-UTF-8 or
    empty file, and ``file:line:col: problem`` on a syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = " ".join(str(err.problem or err.context or "invalid YAML").split())
        raise ConfigError(f"{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(err).split())}") from None
    if data is None:
        # an empty file would silently run every default: almost always the wrong file or a lost edit
        raise ConfigError(f"{path}: config file is empty")
    return data


def load_config(model: type[M], path: str | Path) -> M:
    """Read and validate a YAML config file."""
    return validate(model, read_yaml(path), source=str(path))
