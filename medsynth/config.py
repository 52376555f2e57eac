"""Validated configuration: pydantic models that reject unknown keys, and YAML loading with clear errors."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from medsynth.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every medsynth config: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class KeyProblem(ValueError):  # noqa: N818 - raised inside validators, reported as a ConfigError
    """Raise inside a cross-field validator to name the offending key (relative to the model validated).

    Pydantic reports errors of a ``model_validator`` at the model's own location; this carries the key so the
    message names e.g. ``models.0.params.target`` instead of ``models.0.params``."""

    def __init__(self, key: str, message: str, allowed: list[str] | None = None) -> None:
        self.key, self.allowed = key, allowed
        super().__init__(message)


def check_with(model: type[BaseModel] | str, data: Any, key: str = "") -> BaseModel:
    """Validate ``data`` with ``model`` (a class or ``"module:Class"``, imported when first needed) inside
    another config's validator; the first problem becomes a :class:`KeyProblem` naming its key under ``key``."""
    if isinstance(model, str):
        module, name = model.split(":")
        model = getattr(importlib.import_module(module), name)
    if not isinstance(data, dict):
        raise KeyProblem(key, f"expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = tuple(e["loc"])
        cause = (e.get("ctx") or {}).get("error")
        inner = ".".join(str(p) for p in loc + ((cause.key,) if isinstance(cause, KeyProblem) else ()))
        full = ".".join(k for k in (key, inner) if k)
        if e["type"] == "extra_forbidden":
            raise KeyProblem(full, "unknown key", allowed=_allowed_keys(model, loc[:-1])) from None
        msg = str(cause) if isinstance(cause, KeyProblem) else e["msg"].removeprefix("Value error, ")
        raise KeyProblem(full, msg) from None


def nested(model: str) -> Any:
    """Type of a config section kept as the mapping given but validated by ``model`` (``"module:Class"``, imported
    lazily so reading a run config does not import e.g. torch) when the enclosing config is validated."""

    def check(value: dict[str, Any]) -> dict[str, Any]:
        check_with(model, value)
        return value

    return Annotated[dict[str, Any], AfterValidator(check)]


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str, prefix: str = "") -> str:
    """One readable line per problem, naming the dotted key (under ``prefix``) and, for unknown keys, the
    allowed ones."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        cause = (e.get("ctx") or {}).get("error")
        msg = e["msg"]
        if isinstance(cause, KeyProblem):
            loc = loc + tuple(k for k in cause.key.split(".") if k)
            msg = str(cause)
            if cause.allowed is not None:
                key = ".".join([prefix] * bool(prefix) + [str(p) for p in loc])
                lines.append(f"{source}: unknown key '{key}'; allowed keys: {', '.join(cause.allowed)}")
                continue
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        key = ".".join([prefix] * bool(prefix) + [str(p) for p in loc])
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            lines.append(f"{source}: unknown key '{key}'; allowed keys: {', '.join(allowed)}")
        else:
            lines.append(f"{source}: key '{key}': {msg}")
    return "; ".join(lines)


def _allowed_keys(model: type[BaseModel], parent: tuple) -> list[str]:
    cur: Any = model
    for part in parent:
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            # a list index (models.0.…): descend into the list's item type
            if isinstance(part, int) and cur is not None:
                continue
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)) and len(args) == 1:
            ann = args[0]  # list[Model]
        cur = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if cur is None:
            # unions / discriminated families: report nothing rather than guess
            return []
    return sorted(getattr(cur, "model_fields", {}))


def validate(model: type[M], data: Any, source: str = "config", prefix: str = "") -> M:
    """Validate ``data`` (a mapping) into ``model``; raise :class:`ConfigError` naming the bad keys.

    ``prefix`` is the dotted path of ``data`` inside a larger file (e.g. ``models.0.params``), so every
    message names the full key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = f"key '{prefix}': " if prefix else ""
        raise ConfigError(f"{source}: {where}expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source, prefix)) from None


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
