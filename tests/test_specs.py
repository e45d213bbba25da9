"""Specs: examples validate, bad specs give one readable SpecError, schemas are current, files round-trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import SearchSpec, SpecError, TrainSpec, dump_spec, load_spec, parse_spec
from schemas.generate import SCHEMA_DIR, render_schemas

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_spec_validates(path):
    """Each example spec a user copies is valid."""
    spec = load_spec(path)
    assert isinstance(spec, (SearchSpec, TrainSpec))


def test_examples_exist_for_both_engines():
    """Both engines have an example spec."""
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in EXAMPLES}
    assert kinds >= {"search", "train"}


def test_json_schema_files_are_current():
    """schemas/json matches the models; regenerate with `make schema`."""
    for name, text in render_schemas().items():
        path = SCHEMA_DIR / name
        assert path.exists(), f"{path} missing: run `make schema`"
        assert path.read_text() == text, f"{path} is stale: run `make schema`"


@pytest.mark.parametrize("model", [SearchSpec, TrainSpec])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_spec_round_trips_through_a_file(model, suffix, tmp_path):
    """load -> dump -> load gives the same model."""
    spec = model()
    path = tmp_path / f"spec{suffix}"
    dump_spec(spec, path)
    again = load_spec(path, model)
    assert again == spec
    dump_spec(again, tmp_path / f"again{suffix}")
    assert (tmp_path / f"again{suffix}").read_text() == path.read_text()


def test_error_names_field_value_and_allowed(tmp_path):
    """A bad field's error names its path, the bad value and what is allowed."""
    path = tmp_path / "bad.yaml"
    path.write_text("kind: search\nsearch: {optimizer: Adam, budget: 0}\nevaluators: {nmu_actors: 2}\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    text = str(info.value)
    assert "search.optimizer" in text and "'Adam'" in text and "'CMA'" in text
    assert "search.budget" in text and "greater than or equal to 1" in text
    assert "evaluators.nmu_actors" in text and "unknown field" in text
    assert str(path) in text
    assert {e["field"] for e in info.value.errors} == {
        "search.optimizer",
        "search.budget",
        "evaluators.nmu_actors",
    }


def test_cross_field_rule_says_what_to_change():
    """Rules spanning fields say which fields to change."""
    with pytest.raises(SpecError, match=r"model.n_layers.*multiple of.*pipeline.num_stages"):
        parse_spec({"model": {"n_layers": 6}, "pipeline": {"num_stages": 4}}, TrainSpec)
    with pytest.raises(SpecError, match=r"failures.schedule.*stage 7"):
        parse_spec({"failures": {"schedule": [[3, 7]]}}, TrainSpec)


@pytest.mark.parametrize(
    "text,needle",
    [
        ("kind: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "must hold a mapping"),
        ("kind: banana\n", "unknown spec kind 'banana'"),
    ],
)
def test_malformed_files_are_spec_errors(tmp_path, text, needle):
    """Malformed YAML, a non-mapping and an unknown kind are SpecErrors naming the problem."""
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=needle):
        load_spec(path)


def test_missing_file_is_spec_error(tmp_path):
    """A missing spec file is a SpecError naming it."""
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**6), 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from(
    [
        "kind",
        "seed",
        "ray",
        "search",
        "checkpoints",
        "fid",
        "evaluators",
        "model",
        "pipeline",
        "recovery",
        "failures",
        "steps",
        "output",
        "optim",
        "bogus",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.dictionaries(field_names, json_values, max_size=4), model=st.sampled_from([SearchSpec, TrainSpec])
)
def test_generated_specs_raise_spec_error_or_validate(data, model):
    """Arbitrary spec data either validates or raises SpecError; never another exception."""
    try:
        parse_spec(data, model)
    except SpecError as exc:
        assert str(exc).startswith("invalid") and exc.errors


@settings(max_examples=60, deadline=None)
@given(budget=st.one_of(st.integers(max_value=0), st.floats(allow_nan=True), st.text(max_size=4)))
def test_bad_budgets_name_the_field(budget):
    """Every bad budget is reported at `search.budget`."""
    try:
        spec = parse_spec({"search": {"budget": budget}}, SearchSpec)
    except SpecError as exc:
        assert "search.budget" in str(exc)
    else:
        assert spec.search.budget >= 1


def test_cli_validate_ok_and_errors(tmp_path):
    """`lcsc-ray validate` prints OK for a good spec and exits 2 with the errors for a bad one."""
    good = subprocess.run(
        [sys.executable, "-m", "lcsc_ray", "validate", str(EXAMPLES[0])],
        capture_output=True,
        text=True,
        check=False,
    )
    assert good.returncode == 0 and "OK" in good.stdout
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "train", "steps": 0}))
    result = subprocess.run(
        [sys.executable, "-m", "checkfree_ray", "validate", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "steps" in result.stderr and "greater than or equal to 1" in result.stderr
