"""What a training run measured, step by step (`History`), and its JSON form kept in each checkpoint (a resumed
run continues the same history)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from schemas.train_result import FailureRecord


@dataclass
class History:
    """What the run measured, step by step."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    wall_times: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    val_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)
    failures: list[FailureRecord] = field(default_factory=list)
    rolled_back: list[bool] = field(
        default_factory=list
    )  # per entry of `steps`: discarded by a later rollback
    recovery_phases: list[dict[str, float]] = field(
        default_factory=list
    )  # seconds from detection, per recovery
    costs: dict[str, float] = field(default_factory=dict)
    checkpoint_intervals: list[dict] = field(default_factory=list)  # hybrid: each interval chosen, and why
    node_events: list[dict] = field(
        default_factory=list
    )  # stages' node losses, drain notices, hand-offs and rebuilds ({time, kind, stage, node_id, ...})


def save_history(history: History) -> dict[str, Any]:
    """A JSON-able copy of the executor's `History` (failure records as dicts)."""
    out = {}
    for item in dataclasses.fields(history):
        value = getattr(history, item.name)
        if item.name == "failures":
            value = [record.model_dump(mode="json") for record in value]
        out[item.name] = json.loads(json.dumps(value))
    return out


def restore_history(history: History, state: dict[str, Any]) -> None:
    """Load `save_history`'s output into a `History` (fields it lacks keep their defaults)."""
    for item in dataclasses.fields(history):
        if item.name in state:
            value = state[item.name]
            if item.name == "failures":
                value = [FailureRecord.model_validate(record) for record in value]
            setattr(history, item.name, value)
