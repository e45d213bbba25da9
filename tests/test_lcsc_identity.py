"""Run identity of an LCSC search: changed inputs are refused, bad specs leave nothing, finished runs are kept."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from lcsc_ray.cli import main
from lcsc_ray.evaluation_store import EvaluationStore
from lcsc_ray.run_identity import FINGERPRINT_FILE, prepare_state, state_uri
from lcsc_ray.search import check_resumable
from rayops import artifacts
from schemas.errors import SpecError
from schemas.search import SearchSpec
from tests.lcsc_plugins import trajectory, write_run
from tests.test_lcsc_search import tiny_spec


def _with(spec: SearchSpec, **sections) -> SearchSpec:
    data = spec.model_dump()
    for section, values in sections.items():
        data[section].update(values)
    return SearchSpec.model_validate(data)


def test_checkpoints_changed_under_an_unchanged_spec_are_refused(tmp_path):
    """Training went on (a new newest checkpoint) and a file was rewritten: the error names both and --restart."""
    spec = _with(tiny_spec(tmp_path), checkpoints={"last": 4})
    prepare_state(spec)
    prepare_state(spec)  # same inputs: resumes
    ckpts = sorted((tmp_path / "ckpts").glob("*.safetensors"))
    save_file(
        trajectory(6)[-1], str(tmp_path / "ckpts" / "ckpt-000600.safetensors"), metadata={"step": "600"}
    )
    with pytest.raises(SpecError) as caught:
        prepare_state(spec)
    message = str(caught.value)
    assert re.search(r"checkpoints\[3\]: .*step, uri changed", message), message
    assert "--restart" in message and "output.uri" in message
    (tmp_path / "ckpts" / "ckpt-000600.safetensors").unlink()
    save_file(trajectory(5, seed=9)[1], str(ckpts[1]), metadata={"step": "200"})  # same name, other weights
    with pytest.raises(SpecError, match=r"checkpoints\[0\]: sha256 changed"):
        prepare_state(spec)


def test_a_sampler_that_declares_a_new_revision_is_refused(tmp_path, monkeypatch):
    """A plug-in whose `lcsc_revision` changed (the same call now gives other images, as the recipe's DDIM did
    on its move to diffusers) is a changed input: the stored search is not resumed with it."""
    import tests.lcsc_plugins as plugins

    spec = tiny_spec(tmp_path)
    monkeypatch.setattr(plugins.toy_sample, "lcsc_revision", "1", raising=False)
    prepare_state(spec)
    stored = json.loads((tmp_path / "out" / "state" / FINGERPRINT_FILE).read_text())
    assert stored["sampler"]["revision"] == "1"
    prepare_state(spec)  # same revision: resumes
    monkeypatch.setattr(plugins.toy_sample, "lcsc_revision", "2")
    with pytest.raises(SpecError, match=r"sampler: revision changed"):
        prepare_state(spec)


def test_restart_clears_the_state_and_records_the_new_inputs(tmp_path):
    """--restart removes stored evaluations and the old fingerprint; the changed inputs are then accepted."""
    spec = tiny_spec(tmp_path)
    digest = prepare_state(spec)
    store = EvaluationStore(state_uri(spec, "evaluations"), identity=digest)
    store.put([0.2, 0.2, 0.2, 0.2, 0.2], 64, 0, {"fid": 1.5})
    save_file(trajectory(5, seed=3)[4], str(max((tmp_path / "ckpts").glob("*"))), metadata={"step": "500"})
    with pytest.raises(SpecError):
        prepare_state(spec)
    new_digest = prepare_state(spec, restart=True)
    assert new_digest != digest
    assert not (tmp_path / "out" / "state" / "evaluations").exists()
    stored = json.loads((tmp_path / "out" / "state" / FINGERPRINT_FILE).read_text())
    assert stored["checkpoints[4]"]["step"] == 500 and len(stored["checkpoints[4]"]["sha256"]) == 64


def test_evaluation_records_are_keyed_by_the_inputs(tmp_path):
    """A record made over other inputs is never replayed; a trial's store reads the identity the driver bound."""
    uri = str(tmp_path / "evaluations")
    EvaluationStore(uri, identity="aaa").put([0.5, 0.5], 64, 0, {"fid": 3.0})
    assert EvaluationStore(uri).get([0.5, 0.5], 64, 0)["fid"] == 3.0  # trial store: identity from the driver
    assert EvaluationStore(uri, identity="bbb").get([0.5, 0.5], 64, 0) is None
    assert EvaluationStore(uri).get([0.5, 0.5], 64, 0) is None  # the driver re-bound the store to "bbb"


def test_a_typo_in_model_target_leaves_nothing_and_the_fix_runs(tmp_path):
    """A plug-in that does not import is refused before anything is written; the corrected spec then runs."""
    good = tiny_spec(tmp_path)
    typo = _with(good, model={"target": "tests.lcsc_plugins:build_tinyy"})
    with pytest.raises(SpecError, match=r"`model.target`.*build_tinyy"):
        check_resumable(typo)
    assert not (tmp_path / "out").exists()
    check_resumable(good)
    assert (tmp_path / "out" / "state" / "spec.json").exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"checkpoints": {"glob": "ckpt-000100*"}}, "checkpoints.glob"),
        ({"checkpoints": {"paths": ["ckpt-000100.safetensors", "nope.safetensors"]}}, "checkpoints.paths"),
        ({"search": {"bound": 0.05}}, "search.bound"),
        ({"checkpoints": {"ema_uri": "/no/such/ema.safetensors"}}, "checkpoints.ema_uri"),
    ],
)
def test_load_time_problems_exit_2_naming_the_field(tmp_path, change, field):
    """One matched checkpoint, a missing path, a seed vector outside the bound: exit 2, field named, no files."""
    spec = _with(tiny_spec(tmp_path), **change)
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    result = CliRunner().invoke(main, ["search", str(spec_file)])
    assert result.exit_code == 2, result.output
    assert field in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_finished_search_prints_its_stored_result(tmp_path):
    """Rerunning a complete output prints the stored table without searching (no Ray, no new files)."""
    from tests.test_paired import _result_with

    spec = tiny_spec(tmp_path)
    prepare_state(spec)
    stored = _result_with([67.0, 70.1, 73.9], [69.0, 72.0, 76.0]).model_copy(update={"spec": spec})
    artifacts.write_artifact(str(tmp_path / "out"), {"result.json": stored.model_dump_json().encode()})
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    before = sorted(p.name for p in (tmp_path / "out").rglob("*"))
    result = CliRunner().invoke(main, ["search", str(spec_file)])
    assert result.exit_code == 0, result.output
    assert "LCSC beat ema@0.9" in result.output
    assert sorted(p.name for p in (tmp_path / "out").rglob("*")) == before


def test_a_complete_result_keeps_its_manifest_until_the_new_one_is_written(tmp_path, monkeypatch):
    """A result rewrite that dies halfway leaves the old result complete (the reader gets old or an error)."""
    from rayops import storage

    out = str(tmp_path / "out")
    artifacts.write_artifact(out, {"a.json": b"old-a", "result.json": b"old"}, keep_old_manifest=True)
    real = storage.write_bytes

    def dies_at_result(uri, data):
        if uri.endswith("result.json"):
            raise OSError("killed")
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", dies_at_result)
    with pytest.raises(OSError):
        artifacts.write_artifact(out, {"a.json": b"new-a", "result.json": b"new"}, keep_old_manifest=True)
    assert artifacts.is_complete(out)
    assert artifacts.read_artifact_file(out, "result.json") == b"old"


def test_secret_looking_plugin_kwargs_are_redacted_in_written_state(tmp_path):
    """A token in plug-in kwargs never reaches spec.json, the fingerprint or a result dump; jobs still get it."""
    from schemas.loader import dump_spec, load_spec

    spec = _with(tiny_spec(tmp_path), model={"kwargs": {"channels": 4, "api_token": "s3cr3t-value"}})
    prepare_state(spec)
    for name in ("spec.json", FINGERPRINT_FILE):
        text = (tmp_path / "out" / "state" / name).read_text()
        assert "s3cr3t-value" not in text and "<redacted>" in text
    assert "s3cr3t-value" not in spec.model_dump_json()
    dump_spec(spec, tmp_path / "job.yaml")
    assert load_spec(tmp_path / "job.yaml", SearchSpec).model.kwargs["api_token"] == "s3cr3t-value"


def test_explicit_paths_keep_two_or_more(tmp_path):
    """`paths: []` and a single path are refused by the schema, naming `checkpoints.paths`."""
    write_run(Path(tmp_path) / "ckpts", num=2)
    for paths in ([], ["a.safetensors"]):
        with pytest.raises(ValueError, match="checkpoints.paths"):
            from schemas.loader import parse_spec

            parse_spec({"checkpoints": {"paths": paths}}, SearchSpec)


def test_restart_into_a_running_searchs_output_is_refused_and_keeps_its_state(tmp_path):
    """A second search with --restart meets the running one's lock before it can clear that search's state."""
    from lcsc_ray.search import run_search
    from rayops.output_lock import OutputLock, OutputLockedError

    spec = tiny_spec(tmp_path)
    prepare_state(spec)
    spec_file = tmp_path / "out" / "state" / "spec.json"
    before = spec_file.read_bytes()
    with OutputLock(spec.output.uri, what="search"), pytest.raises(OutputLockedError):  # a search is running
        run_search(spec, restart=True)
    assert spec_file.read_bytes() == before
    assert (tmp_path / "out" / "state" / FINGERPRINT_FILE).exists()
