"""Bad search specs fail at validation: exit code 2, the field named, never a traceback (fuzzed)."""

from __future__ import annotations

import inspect
import json
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lcsc_ray.cli import main
from lcsc_ray.coefficients import normalized_sum_problem
from lcsc_ray.trials import TrialFailedError, evaluate_candidate

# (field path as the error names it, strategy of (section, key, bad value))
ints = st.integers(min_value=-(10**6), max_value=10**6)
BAD_VALUES = st.one_of(
    st.tuples(
        st.just("search.ema_decays"),
        st.just("search"),
        st.just("ema_decays"),
        st.lists(
            st.one_of(
                st.floats(max_value=0.0, allow_nan=False),
                st.floats(min_value=1.0, allow_nan=False, allow_infinity=False),
            ),
            min_size=1,
            max_size=3,
        ),
    ),
    st.tuples(
        st.just("fid.holdout_seeds"),
        st.just("fid"),
        st.just("holdout_seeds"),
        st.lists(ints, min_size=1, max_size=4).map(lambda seeds: [*seeds, seeds[0]]),
    ),
    st.tuples(
        st.just("fid.holdout_seeds"),
        st.just("fid"),
        st.just("holdout_seeds"),
        st.lists(st.integers(1, 10**6), max_size=3).map(lambda seeds: [0, *seeds]),
    ),
    st.tuples(
        st.just("search.fidelity_schedule"),
        st.just("search"),
        st.just("fidelity_schedule"),
        st.lists(st.integers(-5, 1), min_size=1, max_size=3).map(lambda low: [*low, 500]),
    ),
    st.tuples(
        st.just("search.fidelity_schedule"),
        st.just("search"),
        st.just("fidelity_schedule"),
        st.integers(2, 10**5).map(lambda n: [n, n]),
    ),
    st.tuples(
        st.just("checkpoints.paths"),
        st.just("checkpoints"),
        st.just("paths"),
        st.lists(st.text("abc.", min_size=1, max_size=8), max_size=1),
    ),
    st.tuples(st.just("search.budget"), st.just("search"), st.just("budget"), st.integers(max_value=0)),
    st.tuples(
        st.just("search.bound"),
        st.just("search"),
        st.just("bound"),
        st.floats(max_value=0.0, allow_nan=False, allow_infinity=False),
    ),
    st.tuples(
        st.just("search.optimizer"),
        st.just("search"),
        st.just("optimizer"),
        st.text(min_size=1, max_size=10).filter(lambda s: s not in {"CMA", "DE", "NGOpt", "PSO"}),
    ),
    st.tuples(
        st.just("model.target"),
        st.just("model"),
        st.just("target"),
        st.text(max_size=12).filter(lambda s: ":" not in s),
    ),
    st.tuples(
        st.just("evaluators.num_actors"),
        st.just("evaluators"),
        st.just("num_actors"),
        st.one_of(
            st.integers(max_value=0), st.text(min_size=1, max_size=5).filter(lambda s: not s.isdigit())
        ),
    ),
    st.tuples(st.just("fid.num_samples"), st.just("fid"), st.just("num_samples"), st.integers(max_value=1)),
    st.tuples(st.just("search.unknown_knob"), st.just("search"), st.just("unknown_knob"), ints),
)


def _invoke(data: dict) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spec.json"
        path.write_text(json.dumps(data))
        result = CliRunner().invoke(main, ["validate", str(path)])
    return result.exit_code, result.output + (str(result.exception) if result.exception else "")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(BAD_VALUES)
def test_every_invalid_spec_exits_2_naming_its_field(bad):
    """One bad field in an otherwise valid spec: exit code 2, a message naming that field, no traceback."""
    field, section, key, value = bad
    code, output = _invoke({section: {key: value}})
    assert code == 2, output
    assert field in output, output
    assert "Traceback" not in output


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.one_of(st.none(), st.booleans(), ints, st.text(max_size=5)),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=8,
    )
)
def test_arbitrary_documents_never_crash_the_loader(document):
    """Any JSON document is either a valid spec (exit 0) or refused with exit 2, never a traceback."""
    code, output = _invoke(document)
    assert code in (0, 2), output
    assert "Traceback" not in output


def test_normalized_proposal_with_a_tiny_sum_is_scored_failed():
    """With 'normalized', free values summing below 0.05 fail the trial with their reason, unevaluated."""
    config = {"x000": 0.5, "x001": -0.49, "label": "search"}
    # no evaluator pool at all: the candidate must be refused before anything is asked of one
    kwargs = {name: None for name in inspect.signature(evaluate_candidate).parameters if name != "config"}
    kwargs.update(names=["x000", "x001"], parametrization="normalized", schedule=[64], seed=0)
    with pytest.raises(TrialFailedError, match=r"sum to 0.01, below 0.05"):
        evaluate_candidate(config, **kwargs)
    assert normalized_sum_problem([0.5, -0.49], "difference") is None
    assert normalized_sum_problem([0.03, 0.03], "normalized") is None


@pytest.mark.parametrize("data", [{"search": {"ema_decays": [0.0]}}, {"search": {"ema_decays": [1.0]}}])
def test_ema_decays_at_the_ends_are_refused(data):
    """0 (the last checkpoint again) and 1 (no decay) are outside (0, 1)."""
    code, output = _invoke(data)
    assert code == 2 and "search.ema_decays[0]" in output
