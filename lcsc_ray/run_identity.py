"""What an LCSC search depends on, checked before anything is written or reused.

`prepare_state(spec)` runs every check a spec can fail before any work (plug-ins import, at least two
checkpoints found, seed vectors inside the bound), then compares the search's inputs with the fingerprint
stored in `output.uri/state/` by an earlier run: the spec (minus where Ray runs), each checkpoint's URI, size,
step and content hash, the EMA file, the reference statistics, the feature network's weights file and every
plug-in with its kwargs. Any difference is refused with the list of what changed and how to start over.
Only when everything passed are `state/fingerprint.json` and `state/spec.json` written, so a spec that
fails a check leaves nothing behind and its corrected version runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from typing import Any

import numpy as np

from lcsc_ray import coefficients as coef
from lcsc_ray.checkpoints import ema_file, list_checkpoints
from lcsc_ray.plugins import PluginError, resolve
from rayops import artifacts, identity, storage
from schemas.common import PluginSpec, redact_secrets
from schemas.errors import CheckpointError, SpecError
from schemas.search import SearchSpec
from schemas.search_rules import DIFFUSERS_SAMPLER

log = logging.getLogger(__name__)

STATE_DIR = "state"
SPEC_FILE = "spec.json"
FINGERPRINT_FILE = "fingerprint.json"
# What a search writes besides its result files; `--restart` removes all of it.
RUN_STATE = (STATE_DIR, "tune", "reference_stats")
START_OVER = "start over with `--restart` (clears the stored state), or give this search another `output.uri`"


def state_uri(spec: SearchSpec, name: str = "") -> str:
    """A file (or the folder) of the search's state under `output.uri/state/`."""
    return (
        storage.join(spec.output.uri, STATE_DIR, name) if name else storage.join(spec.output.uri, STATE_DIR)
    )


def clear_state(spec: SearchSpec) -> None:
    """Remove the stored state, Tune experiments and cached reference statistics of `output.uri`."""
    for name in RUN_STATE:
        storage.delete(storage.join(spec.output.uri, name), recursive=True)


def plugins(spec: SearchSpec) -> dict[str, PluginSpec]:
    """The spec's plug-ins by field name (the dataset only when it is the reference's source)."""
    found = {"model": spec.model, "sampler": spec.sampler, "fid.features": spec.fid.features}
    reference = spec.fid.reference
    if reference.stats_uri is None and reference.dataset is not None:
        found["fid.reference.dataset"] = reference.dataset
    return found


def _check_plugins(spec: SearchSpec) -> None:
    for field, plugin in plugins(spec).items():
        try:
            resolve(plugin.target)
        except PluginError as exc:
            raise SpecError(f"`{field}.target`: {exc}", source=field) from None


def check_sampler_kwargs(spec: SearchSpec) -> None:
    """The built-in diffusers sampler's kwargs, checked before any sampling (a scheduler name or config key it
    would not take is a SpecError naming it)."""
    if spec.sampler.target == DIFFUSERS_SAMPLER:
        from lcsc_ray.diffusers_sampling import check_kwargs

        check_kwargs(spec.sampler.kwargs)


def _check_files(spec: SearchSpec) -> None:
    for field, uri in (
        ("checkpoints.ema_uri", ema_file(spec.checkpoints)),
        ("fid.reference.stats_uri", spec.fid.reference.stats_uri),
    ):
        if uri is not None and not storage.exists(uri):
            raise SpecError(
                f"`{field}`: {uri} does not exist; fix the path or remove the field", source=field
            )


def _list_checked(spec: SearchSpec) -> list[tuple[str, int]]:
    where = (
        "`checkpoints.paths`"
        if spec.checkpoints.paths
        else f"`checkpoints.uri` ({spec.checkpoints.uri}) and `checkpoints.glob` ({spec.checkpoints.glob!r})"
    )
    try:
        found = list_checkpoints(spec.checkpoints)
    except CheckpointError as exc:
        raise SpecError(f"{exc} (checked {where})", source="checkpoints") from None
    if len(found) < 2:
        raise SpecError(
            f"{where} matched {len(found)} checkpoint(s); a combination needs at least 2: "
            f"{[uri for uri, _ in found]}",
            source="checkpoints",
        )
    return found


def check_seed_vectors(spec: SearchSpec, num_checkpoints: int) -> None:
    """Every seed vector's free values must lie in [-bound, bound]; refuse, naming the bound that fits."""
    bound = spec.search.bound
    for label, alphas in coef.seed_vectors(num_checkpoints, spec):
        free = coef.from_alphas(alphas, spec.search.parametrization)
        largest = float(np.max(np.abs(free))) if len(free) else 0.0
        if largest > bound + 1e-12:
            raise SpecError(
                f"`search.bound` ({bound:g}) is too small for the seed vector {label!r}: its free values reach "
                f"{largest:.4g}; set `search.bound` to at least {largest:.4g}",
                source="search.bound",
            )


POSTHOC_SEED = "best-posthoc-ema"  # the seed the post-hoc EMA grid may add (lcsc_ray.search.run_posthoc)


def seed_labels(spec: SearchSpec, num_checkpoints: int) -> list[str]:
    """Every seed vector the search evaluates first over `num_checkpoints`, before the budget caps them: those of
    `lcsc_ray.coefficients.seed_vectors`, and a place for the post-hoc EMA seed with `posthoc_ema`."""
    uncapped = spec.model_copy(update={"search": spec.search.model_copy(update={"budget": sys.maxsize})})
    labels = [label for label, _ in coef.seed_vectors(num_checkpoints, uncapped)]
    return labels[:1] + [POSTHOC_SEED] + labels[1:] if spec.posthoc_ema is not None else labels


def check_budget(spec: SearchSpec, num_checkpoints: int) -> None:
    """Refuse a `search.budget` below the number of seed vectors: the seeds past it, and the baselines they
    report, would be dropped. A budget of exactly the seeds runs no optimiser trial (logged)."""
    labels = seed_labels(spec, num_checkpoints)
    budget = spec.search.budget
    if budget < len(labels):
        raise SpecError(
            f"`search.budget` ({budget}) is smaller than the {len(labels)} seed vectors the search evaluates first "
            f"over these {num_checkpoints} checkpoints ({', '.join(labels)}): the seeds past the budget, and the "
            f"baselines they report, would be dropped; set `search.budget` to at least {len(labels)} plus the "
            "evaluations the optimiser should get, or remove decays from `search.ema_decays`",
            source="search.budget",
        )
    if budget == len(labels):
        log.warning(
            "`search.budget` (%d) holds only the %d seed vectors: the optimiser gets no evaluation",
            budget,
            len(labels),
        )


def preflight(spec: SearchSpec) -> list[tuple[str, int]]:
    """Every check a spec can fail before any work: plug-ins import, files exist, at least 2 checkpoints, a
    budget that holds the seed vectors, seed vectors within the bound. Returns the checkpoints as (uri, step),
    in combination order."""
    _check_plugins(spec)
    check_sampler_kwargs(spec)
    _check_files(spec)
    checkpoints = _list_checked(spec)
    check_budget(spec, len(checkpoints))
    check_seed_vectors(spec, len(checkpoints))
    return checkpoints


def plugin_revision(target: str) -> str | None:
    """The `lcsc_revision` a plug-in declares (the built-in recipes do; see `lcsc_ray.recipes.mnist`), else None."""
    revision = getattr(resolve(target), "lcsc_revision", None)
    return None if revision is None else str(revision)


def _plugin(plugin: PluginSpec) -> dict[str, Any]:
    return identity.plugin_entry(plugin.target, redact_secrets(plugin.kwargs), plugin_revision(plugin.target))


def statistics_digest(mu: np.ndarray, sigma: np.ndarray) -> str:
    """sha256 of reference statistics as float64 (what a dataset plug-in produced)."""
    digest = hashlib.sha256(np.ascontiguousarray(mu, np.float64).tobytes())
    digest.update(np.ascontiguousarray(sigma, np.float64).tobytes())
    return digest.hexdigest()


def fingerprint(spec: SearchSpec, checkpoints: list[tuple[str, int]]) -> dict[str, Any]:
    """The identity of every input: checkpoint files (with step), EMA, reference, feature weights, plug-ins."""
    from lcsc_ray.fid import reference_stats_for

    entries: dict[str, Any] = {
        f"checkpoints[{i}]": identity.file_entry(uri, step=step) for i, (uri, step) in enumerate(checkpoints)
    }
    if spec.checkpoints.ema_uri:
        entries["checkpoints.ema_uri"] = identity.file_entry(ema_file(spec.checkpoints))
    if spec.posthoc_ema is not None:  # the power-EMA snapshots a post-hoc EMA baseline combines
        from lcsc_ray.posthoc_ema import list_snapshots

        block = spec.posthoc_ema
        for i, snapshot in enumerate(list_snapshots(block.uri, block.glob, block.step or checkpoints[-1][1])):
            entries[f"posthoc_ema[{i}]"] = identity.file_entry(
                snapshot.uri, step=snapshot.step, gamma=snapshot.gamma
            )
    for field, plugin in plugins(spec).items():
        entries[field] = _plugin(plugin)
    for name, value in spec.fid.features.kwargs.items():
        if "weights" in name and isinstance(value, str) and storage.exists(value):
            entries[f"fid.features.kwargs.{name}"] = identity.file_entry(value)
    if spec.fid.reference.stats_uri:
        entries["fid.reference.stats_uri"] = identity.file_entry(spec.fid.reference.stats_uri)
    else:  # the statistics the dataset plug-in produced (computed once, cached under output.uri)
        entries["fid.reference.statistics"] = {"sha256": statistics_digest(*reference_stats_for(spec))}
    return entries


def _spec_record(spec: SearchSpec) -> dict[str, Any]:
    # where Ray runs does not change the search; everything else does. Fields at their default are left out, so a
    # field added in a later release (at its default) does not make an earlier search look like another one.
    return spec.model_dump(mode="json", exclude={"ray"}, exclude_defaults=True)


def _check_spec(spec: SearchSpec) -> bool:
    """Refuse a stored spec that differs; True when one is stored (this is a resume)."""
    uri = state_uri(spec, SPEC_FILE)
    if not storage.exists(uri):
        return False
    stored, current = artifacts.read_state_json(uri), _spec_record(spec)
    if stored != current:
        changed = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        raise SpecError(
            f"{spec.output.uri} holds a search with a different spec (changed: {', '.join(changed)}); "
            f"resume it with its original spec, or {START_OVER.replace('another', 'a new')}",
            source=uri,
        )
    return True


def prepare_state(spec: SearchSpec, restart: bool = False) -> str:
    """Check the spec and the search's inputs, then record (or verify against) the stored identity.

    With `restart`, the stored state is removed first. Returns the digest of the inputs' fingerprint, which
    keys the stored evaluations."""
    checkpoints = preflight(spec)
    if restart:
        log.info("--restart: removing the stored state of %s", spec.output.uri)
        clear_state(spec)
    resumed = _check_spec(spec)
    current = fingerprint(spec, checkpoints)
    fingerprint_uri = state_uri(spec, FINGERPRINT_FILE)
    stored = artifacts.read_state_json(fingerprint_uri) if storage.exists(fingerprint_uri) else None
    if stored is None and resumed:
        raise SpecError(
            f"{spec.output.uri} holds a search state without a fingerprint of its inputs, so it "
            f"cannot be checked; {START_OVER}",
            source=fingerprint_uri,
        )
    if stored is not None and stored != current:
        changes = "\n  ".join(identity.describe_changes(stored, current))
        raise SpecError(
            f"{spec.output.uri} holds a search over different inputs; changed since it started:\n  "
            f"{changes}\n{START_OVER}",
            source=fingerprint_uri,
        )
    if stored is None:
        storage.write_bytes(fingerprint_uri, json.dumps(current, indent=2, sort_keys=True).encode())
    if not resumed:  # the spec last: its presence means every check passed and the fingerprint is recorded
        storage.write_bytes(state_uri(spec, SPEC_FILE), json.dumps(_spec_record(spec), indent=2).encode())
    return identity.digest(current)


def recorded_identity(spec: SearchSpec) -> str:
    """The digest of the fingerprint recorded by `prepare_state` (which keys the stored evaluations)."""
    return identity.digest(artifacts.read_state_json(state_uri(spec, FINGERPRINT_FILE)))
