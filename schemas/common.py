"""Parts shared by every spec: the base model, Ray connection, output location, plug-in references."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializationInfo, field_serializer, field_validator

PLUGIN_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
# Plug-in kwargs whose names look like credentials are written as REDACTED in every JSON dump (result.json,
# combined.json, the search's state); only `dump_spec` (a spec handed to a job) keeps them.
SECRET_NAME = re.compile(r"(^|[_\-])(token|key|password|passwd|secret|credentials?)($|[_\-])", re.IGNORECASE)
REDACTED = "<redacted>"
KEEP_SECRETS = "keep_secrets"  # serialization context flag: {"keep_secrets": True} disables the redaction


def redact_secrets(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A copy of plug-in kwargs with secret-looking names' values replaced by REDACTED (nested dicts too)."""
    out: dict[str, Any] = {}
    for name, value in kwargs.items():
        if SECRET_NAME.search(str(name)) and value is not None:
            out[name] = REDACTED
        elif isinstance(value, dict):
            out[name] = redact_secrets(value)
        else:
            out[name] = value
    return out


class StrictModel(BaseModel):
    """Base of every spec: unknown fields are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RaySpec(StrictModel):
    """Where and with what resources the job runs on Ray."""

    address: str | None = Field(
        default=None,
        description="Ray cluster to attach to ('auto', 'ray://host:10001', 'host:6379'). "
        "None uses $RAY_ADDRESS, else starts a local Ray instance.",
    )
    num_cpus: int | None = Field(
        default=None, ge=1, description="CPUs of a locally started Ray; None means all cores."
    )
    object_store_memory: int | None = Field(
        default=None,
        ge=78_643_200,
        description="Object-store bytes of a locally started Ray; None lets Ray choose.",
    )
    namespace: str = Field(default="lcsc-checkfree", description="Ray namespace of the job's actors.")


class OutputSpec(StrictModel):
    """Where results, plots and checkpoints are written."""

    uri: str = Field(
        default="outputs/run",
        description="Local path, file:// or s3://bucket/prefix. Results are written atomically (manifest last).",
    )

    @field_validator("uri")
    @classmethod
    def _uri_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a non-empty path or URI, e.g. 'outputs/run' or 's3://bucket/run'")
        return value.strip()


class PluginSpec(StrictModel):
    """A user-supplied callable referenced by import path, with keyword arguments."""

    target: str = Field(description="Import path 'package.module:callable'.")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments passed to the callable."
    )

    @field_validator("target")
    @classmethod
    def _target_is_import_path(cls, value: str) -> str:
        if not PLUGIN_PATTERN.match(value):
            raise ValueError(f"must look like 'package.module:callable', got {value!r}")
        return value

    @field_serializer("kwargs", when_used="json")
    def _redact(self, kwargs: dict[str, Any], info: SerializationInfo) -> dict[str, Any]:
        if isinstance(info.context, dict) and info.context.get(KEEP_SECRETS):
            return kwargs
        return redact_secrets(kwargs)
