"""Environment variables the project reads, as named constants, resolved in one place."""

from __future__ import annotations

import os

# Standard AWS variables: boto3 reads them; we read the endpoint to choose path-style addressing.
AWS_ENDPOINT_URL = "AWS_ENDPOINT_URL"
AWS_ENDPOINT_URL_S3 = "AWS_ENDPOINT_URL_S3"
AWS_REGION = "AWS_DEFAULT_REGION"

# Our own knobs.
STORAGE_MAX_ATTEMPTS = "LCSC_STORAGE_MAX_ATTEMPTS"
STORAGE_CONNECT_TIMEOUT_S = "LCSC_STORAGE_CONNECT_TIMEOUT_S"
STORAGE_READ_TIMEOUT_S = "LCSC_STORAGE_READ_TIMEOUT_S"
RAY_ADDRESS = "RAY_ADDRESS"

# Settings a locally started Ray needs on these machines (see README "Running locally").
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # bind every Ray listener to 127.0.0.1
    "RAY_AUTH_MODE": "disabled",  # token auth would make `ray job submit` fail with 401
    "RAY_USAGE_STATS_ENABLED": "0",
}


def env_str(name: str, default: str | None = None) -> str | None:
    """The variable's value, or `default` when it is unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or default


def env_int(name: str, default: int) -> int:
    """An integer variable; a malformed value is an error naming the variable."""
    value = env_str(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def env_float(name: str, default: float) -> float:
    """A float variable; a malformed value is an error naming the variable."""
    value = env_str(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a number, got {value!r}") from None


def s3_endpoint(argument: str | None = None) -> str | None:
    """The S3 endpoint: an explicit argument wins, then AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL."""
    return argument or env_str(AWS_ENDPOINT_URL_S3) or env_str(AWS_ENDPOINT_URL)
