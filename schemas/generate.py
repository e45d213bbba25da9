"""Generate the JSON Schema files in schemas/json/ from the pydantic models (`python -m schemas.generate`)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from schemas.search import SearchResult, SearchSpec
from schemas.train import TrainSpec
from schemas.train_result import TrainResult

SCHEMA_DIR = Path(__file__).parent / "json"
MODELS: dict[str, type[BaseModel]] = {
    "search_spec": SearchSpec,
    "search_result": SearchResult,
    "train_spec": TrainSpec,
    "train_result": TrainResult,
}


def render_schemas() -> dict[str, str]:
    """File name -> JSON Schema text for every public model."""
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        for name, model in MODELS.items()
    }


def main() -> None:
    """Write every schema file, replacing stale ones."""
    SCHEMA_DIR.mkdir(exist_ok=True)
    for filename, text in render_schemas().items():
        (SCHEMA_DIR / filename).write_text(text, encoding="utf-8")
        print(f"wrote {SCHEMA_DIR / filename}")


if __name__ == "__main__":
    main()
