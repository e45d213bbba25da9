"""Read specs from YAML or JSON and turn every validation problem into one readable `SpecError`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar, overload

import yaml
from pydantic import BaseModel, ValidationError

from schemas.common import KEEP_SECRETS
from schemas.errors import SpecError
from schemas.search import SearchSpec
from schemas.train import TrainSpec

SPEC_KINDS: dict[str, type[BaseModel]] = {"search": SearchSpec, "train": TrainSpec}
ModelT = TypeVar("ModelT", bound=BaseModel)


def _field_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_validation_error(error: ValidationError, source: str | None = None) -> SpecError:
    """Convert pydantic's error into a `SpecError` listing field path, bad value and what is allowed."""
    lines, records = [], []
    for item in error.errors(include_url=False):
        path = _field_path(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; remove it or check its spelling"
        value = "(missing)" if item["type"] == "missing" else _short(item.get("input"))
        lines.append(f"  {path}: {message} (got {value})")
        records.append({"field": path, "message": message, "value": value})
    where = f" in {source}" if source else ""
    header = f"invalid {error.title}{where}: {len(lines)} error(s)"
    return SpecError("\n".join([header, *lines]), errors=records, source=source)


def parse_spec(data: Any, model: type[ModelT], source: str | None = None) -> ModelT:
    """Validate a mapping as `model`, raising `SpecError` (never a raw pydantic error)."""
    if not isinstance(data, dict):
        raise SpecError(
            f"the spec{' in ' + source if source else ''} must be a mapping of fields, got {type(data).__name__}",
            source=source,
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise format_validation_error(exc, source) from None


def read_spec_data(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict, with a clear error for unreadable or malformed files."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {path}", source=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read spec file {path}: {exc}", source=str(path)) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise SpecError(
            f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}", source=str(path)
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"{path} must hold a mapping of fields, got {type(data).__name__}", source=str(path))
    return data


@overload
def load_spec(path: str | Path, model: type[ModelT]) -> ModelT: ...
@overload
def load_spec(path: str | Path, model: None = None) -> SearchSpec | TrainSpec: ...


def load_spec(path: str | Path, model: type[ModelT] | None = None) -> BaseModel:
    """Load a spec file (YAML or JSON). Without `model`, its `kind` field ('search' or 'train') decides."""
    data = read_spec_data(path)
    if model is None:
        kind = data.get("kind", "search")
        if kind not in SPEC_KINDS:
            raise SpecError(
                f"{path}: kind: unknown spec kind {kind!r}; allowed: {', '.join(map(repr, SPEC_KINDS))}",
                source=str(path),
            )
        model = SPEC_KINDS[kind]
    return parse_spec(data, model, source=str(path))


def dump_spec(spec: BaseModel, path: str | Path) -> None:
    """Write a spec as YAML (or JSON by suffix) such that `load_spec` gives an equal model back."""
    path = Path(path)
    data = spec.model_dump(mode="json", context={KEEP_SECRETS: True})  # the reader needs the real values
    text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
