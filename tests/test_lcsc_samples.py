"""samples.png after a search, and `lcsc-ray samples` redrawing the very samples a reported FID was scored on."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from lcsc_ray import plots
from lcsc_ray.candidate_samples import grid_candidates
from lcsc_ray.cli import main
from lcsc_ray.demo import describe
from lcsc_ray.evaluator import chunk_seed
from lcsc_ray.report import samples_png
from lcsc_ray.sample_files import check_same_checkpoints
from lcsc_ray.search import run_search
from schemas.errors import CheckpointError
from schemas.search import CandidateScore, SearchResult, SearchSpec
from tests.lcsc_plugins import trajectory, write_run


def grid_labels(png: bytes) -> list[str]:
    """The row labels samples.png carries in its text chunk."""
    return Image.open(io.BytesIO(png)).text[plots.SAMPLES_KEY].split("\n")


def test_samples_grid_has_one_labelled_row_per_model():
    """The grid holds one row per model, labelled in order, and is taller with more rows."""
    rows = [(f"model {i}", np.random.default_rng(i).uniform(-1, 1, (8, 1, 8, 8))) for i in range(3)]
    three, one = plots.samples_grid(rows), plots.samples_grid(rows[:1])
    assert grid_labels(three) == ["model 0", "model 1", "model 2"]
    assert Image.open(io.BytesIO(three)).size[1] > 1.8 * Image.open(io.BytesIO(one)).size[1]
    strip = plots.tile_images(rows[0][1], pad=2)
    assert strip.shape == (8, 8 * 10 - 2, 1)
    np.testing.assert_allclose(strip[:, 10:18, 0], (rows[0][1][1, 0] + 1) / 2)  # image 1 after its pad


def _score(label: str, fid: float, coefficients: list[float]) -> CandidateScore:
    return CandidateScore(label=label, coefficients=coefficients, fid=fid, num_samples=64, holdout_fids=[])


def _result(spec: SearchSpec | None = None) -> SearchResult:
    return SearchResult(
        spec=spec or SearchSpec(),
        checkpoint_names=["a", "b"],
        checkpoint_steps=[1, 2],
        best=_score("lcsc", 1.0, [0.3, 0.7]),
        baselines=[
            _score("last", 5.0, [0.0, 1.0]),
            _score("uniform", 3.0, [0.5, 0.5]),
            _score("run-ema", 4.0, []),
            _score("posthoc-ema@0.1", 2.0, []),  # snapshots only: not drawable from the checkpoints
        ],
        gain_found=False,
        num_evaluations=4,
        wall_time_s=1.0,
    )


def test_grid_rows_are_winner_last_ema_and_best_baseline():
    """Rows: winner, last, run EMA, then the best drawable baseline; a best baseline already shown is marked."""
    result = _result()
    assert [c.label for c in grid_candidates(result)] == ["lcsc", "last", "run-ema", "uniform"]
    result.baselines[1].fid = 9.0
    labels = [c.label for c in grid_candidates(result)]
    assert labels == ["lcsc", "last", "run-ema (best baseline)"]
    assert grid_candidates(result)[2].coefficients is None  # the EMA is drawn from the EMA weights


def test_samples_png_is_left_out_with_a_warning_when_it_cannot_be_drawn(tmp_path, caplog):
    """Checkpoints that cannot be read give no samples.png and a warning, not a lost search result."""
    spec = SearchSpec.model_validate({"checkpoints": {"uri": str(tmp_path / "gone")}})
    assert samples_png(spec, _result(spec)) is None
    assert "samples.png is left out" in caplog.text


def test_demo_prints_the_samples_path():
    """The demo's closing lines name samples.png when the search wrote it."""
    result = _result()
    result.files = {"samples.png": "/out/samples.png"}
    assert "/out/samples.png" in describe(result, result.spec)


@pytest.fixture(scope="module")
def finished_search(ray_module, tmp_path_factory) -> tuple[Path, SearchResult]:
    """A finished 5-evaluation search over 4 tiny checkpoints with a run EMA, 64-sample FIDs in 2 chunks."""
    root = tmp_path_factory.mktemp("samples")
    write_run(root / "ckpts", num=4)
    save_file(trajectory(6, seed=3)[-1], str(root / "ema.safetensors"))
    spec = SearchSpec.model_validate(
        {
            "checkpoints": {"uri": str(root / "ckpts"), "ema_uri": str(root / "ema.safetensors")},
            "model": {"target": "tests.lcsc_plugins:build_tiny"},
            "sampler": {"target": "tests.lcsc_plugins:toy_sample", "nfe": 2},
            "fid": {
                "features": {"target": "tests.lcsc_plugins:tiny_features"},
                "reference": {
                    "dataset": {"target": "tests.lcsc_plugins:reference_images", "kwargs": {"n": 128}}
                },
                "num_samples": 64,
                "holdout_seeds": [11, 12],
            },
            "evaluators": {"num_actors": 2, "batch_size": 32, "num_cpus": 0.5},
            "search": {"budget": 5, "optimizer": "CMA", "ema_decays": [0.5]},
            "output": {"uri": str(root / "out")},
        }
    )
    return root, run_search(spec)


@pytest.mark.timeout(300)
def test_search_writes_samples_png(finished_search):
    """A search lists and writes samples.png with rows for the winner, the last checkpoint and the run EMA."""
    root, result = finished_search
    png = (root / "out" / "samples.png").read_bytes()
    assert result.files["samples.png"] == str(root / "out" / "samples.png")
    assert "samples.png" in json.loads((root / "out" / "result.json").read_text())["files"]
    labels = grid_labels(png)
    assert [label.split(",")[0].removesuffix(" (best baseline)") for label in labels[:3]] == [
        "LCSC winner",
        "last",
        "run-ema",
    ]
    assert len(labels) in (3, 4) and f"FID {result.best.fid:.2f}" in labels[0]


def _samples(tmp_path: Path, out: Path, *args: str) -> dict:
    cli = CliRunner().invoke(main, ["samples", str(out), "--out", str(tmp_path), *args])
    assert cli.exit_code == 0, cli.output
    return json.loads((tmp_path / "samples.json").read_text())


@pytest.mark.timeout(300)
def test_samples_command_reproduces_the_reported_fid(finished_search, tmp_path):
    """`lcsc-ray samples` redraws the winner's 64 scored samples; their FID equals the reported FID exactly."""
    root, result = finished_search
    summary = _samples(tmp_path, root / "out", "--npz")
    assert summary["candidate"] == "lcsc" and summary["num_samples"] == 64
    assert summary["fid"] == result.best.fid == summary["reported_fid"]
    assert len(list(tmp_path.glob("[0-9]*.png"))) == 64
    images = np.load(tmp_path / "samples.npz")["images"]
    assert images.shape == (64, 1, 8, 8)
    # the noise of chunk 1 comes from chunk_seed(seed, 1), not from the seed: what a plain pipeline would miss
    assert chunk_seed(result.spec.fid.seed, 1) != result.spec.fid.seed


@pytest.mark.timeout(300)
def test_samples_command_reproduces_baselines_and_held_out_seeds(finished_search, tmp_path):
    """The run EMA on the search seed and the last checkpoint on a held-out seed match their reported FIDs."""
    root, result = finished_search
    by_label = {b.label: b for b in result.baselines}
    ema = _samples(tmp_path / "ema", root / "out", "--candidate", "ema")
    assert ema["fid"] == by_label["run-ema"].fid
    last = _samples(tmp_path / "last", root / "out", "--coefficients", "[0, 0, 0, 1]", "--seed", "12")
    assert last["candidate"] == "last" and last["fid"] == by_label["last"].holdout_fids[1]


@pytest.mark.timeout(300)
def test_samples_command_from_combined_safetensors(finished_search, tmp_path):
    """The exported combined.safetensors gives the winner's reported FID (to float rounding of the export)."""
    root, result = finished_search
    summary = _samples(tmp_path, root / "out", "--weights", str(root / "out" / "combined.safetensors"))
    assert summary["reported_fid"] is None
    assert summary["fid"] == pytest.approx(result.best.fid, rel=1e-6, abs=1e-9)


def test_samples_command_refuses_an_unknown_candidate(finished_search, tmp_path):
    """An unknown candidate is refused with the labels one can choose."""
    root, _ = finished_search
    cli = CliRunner().invoke(
        main, ["samples", str(root / "out"), "--out", str(tmp_path), "--candidate", "nope"]
    )
    assert cli.exit_code == 2 and "uniform" in cli.output and "nope" in cli.output


def test_samples_command_refuses_a_changed_checkpoint_set(finished_search):
    """A checkpoint set that no longer matches the search's is refused, naming both sets."""
    _, result = finished_search
    moved = result.model_copy(
        update={"checkpoint_names": ["other.safetensors", *result.checkpoint_names[1:]]}
    )
    with pytest.raises(CheckpointError, match="other.safetensors"):
        check_same_checkpoints(moved)
    check_same_checkpoints(result)  # the unchanged set passes


@pytest.mark.timeout(300)
def test_samples_command_on_a_moved_output(finished_search, tmp_path):
    """An output copied elsewhere still reproduces the winner's FID, with the reference statistics read there."""
    root, result = finished_search
    shutil.copytree(root / "out", tmp_path / "moved")
    summary = _samples(tmp_path / "samples", tmp_path / "moved")
    assert summary["fid"] == result.best.fid and summary["search"] == str(tmp_path / "moved")
