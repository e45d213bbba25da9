"""Run fingerprints leave out fields at their default, so a field added in a later release (at its default) never
makes an earlier run look like another one, while setting any field still does."""

from __future__ import annotations

from checkfree_ray.run_identity import new_identity, spec_inputs
from lcsc_ray.run_identity import _spec_record
from tests.test_checkfree_resume import tiny_spec as tiny_train_spec
from tests.test_lcsc_search import tiny_spec as tiny_search_spec


def _with(spec, section: str, **fields):
    part = getattr(spec, section).model_copy(update=fields)
    return spec.model_copy(update={section: part})


def test_training_fingerprint_ignores_fields_at_their_default_and_sees_set_ones(tmp_path):
    """A field at its default is absent from the recorded inputs (as in a run recorded before the field existed);
    setting it changes the fingerprint."""
    spec = tiny_train_spec(str(tmp_path / "run"))
    pipeline = spec_inputs(spec).get("spec.pipeline", {})
    assert "schedule" not in pipeline and "activation_transport" not in pipeline
    assert "schedule" in spec_inputs(_with(spec, "pipeline", schedule="1f1b"))["spec.pipeline"]
    assert (
        new_identity(spec).fingerprint != new_identity(_with(spec, "pipeline", schedule="1f1b")).fingerprint
    )
    assert (
        new_identity(spec).fingerprint == new_identity(_with(spec, "pipeline", schedule="gpipe")).fingerprint
    )


def test_search_record_ignores_fields_at_their_default_and_sees_set_ones(tmp_path):
    """The stored search spec leaves out defaults (an added optional block is absent) and keeps set fields."""
    spec = tiny_search_spec(tmp_path)
    record = _spec_record(spec)
    assert "posthoc_ema" not in record and "ray" not in record
    assert record["search"]["budget"] == spec.search.budget
    assert _spec_record(_with(spec, "search", budget=spec.search.budget + 1)) != record
