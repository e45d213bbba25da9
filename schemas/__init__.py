"""The contract: pydantic models of every spec and result, and their loader."""

from schemas.common import OutputSpec, PluginSpec, RaySpec
from schemas.errors import (
    CheckpointError,
    LcscCheckfreeError,
    RecoveryError,
    SpecError,
    StorageError,
)
from schemas.loader import dump_spec, load_spec, parse_spec
from schemas.search import CandidateScore, SearchResult, SearchSpec
from schemas.train import TrainSpec
from schemas.train_result import FailureRecord, TrainResult

__all__ = [
    "CandidateScore",
    "CheckpointError",
    "FailureRecord",
    "LcscCheckfreeError",
    "OutputSpec",
    "PluginSpec",
    "RaySpec",
    "RecoveryError",
    "SearchResult",
    "SearchSpec",
    "SpecError",
    "StorageError",
    "TrainResult",
    "TrainSpec",
    "dump_spec",
    "load_spec",
    "parse_spec",
]
