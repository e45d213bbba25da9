"""The project's exception hierarchy: every error a user sees names the thing and the fix."""

from __future__ import annotations


class LcscCheckfreeError(Exception):
    """Base class of every error this project raises on purpose."""


class SpecError(LcscCheckfreeError, ValueError):
    """A spec file or object is invalid; the message lists each bad field, its value and what is allowed."""

    def __init__(self, message: str, errors: list[dict] | None = None, source: str | None = None):
        self.errors = errors or []
        self.source = source
        super().__init__(message)


class StorageError(LcscCheckfreeError):
    """A storage operation failed; the message names the URI (never a credential)."""

    def __init__(self, message: str, uri: str | None = None):
        self.uri = uri
        super().__init__(message)


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object, prefix or bucket does not exist."""


class StoragePermissionError(StorageError, PermissionError):
    """The credentials were refused (wrong keys, no access to the bucket)."""


class StorageUnavailableError(StorageError, ConnectionError):
    """The storage endpoint stayed unreachable or failing after bounded retries."""


class IncompleteArtifactError(StorageError):
    """An artifact has no manifest yet: its writer died or is still writing."""


class ChecksumError(StorageError):
    """A file's size or sha256 does not match its artifact manifest."""


class CheckpointError(LcscCheckfreeError):
    """A checkpoint is unreadable, truncated or does not match the others; the message names the file."""


class RecoveryError(LcscCheckfreeError):
    """A training run cannot be recovered correctly (e.g. two adjacent stages lost and no checkpoint)."""


class ReferenceStatsError(LcscCheckfreeError, ValueError):
    """Reference FID statistics (`.npz`) are unreadable or unusable; the message names the file and the field."""


class StateFileError(LcscCheckfreeError):
    """A state or result file read on resume is corrupt; the message names it and how to start over."""


class RunConflictError(LcscCheckfreeError):
    """The output already holds another run (different spec); the message names that run and the fix."""


class PluginError(LcscCheckfreeError, ImportError):
    """A plug-in cannot be imported or built; the message names the plug-in, the spec field and its own error."""


class InfeasibleResourcesError(SpecError):
    """A fixed-size cluster can never place what the spec asks for; the message names both and the fields."""
