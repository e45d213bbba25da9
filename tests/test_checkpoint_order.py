"""Checkpoint order is never guessed: files without a step are refused, globs stay in their folder, explicit
`paths` keep their order, and an output folder inside the checkpoint folder is refused."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from lcsc_ray.checkpoints import list_checkpoints
from lcsc_ray.cli import main as lcsc_main
from schemas.errors import CheckpointError
from schemas.search import CheckpointSetSpec
from tests.lcsc_plugins import trajectory, write_run


def test_file_without_step_is_refused_by_name(tmp_path):
    """One listed file with neither step metadata nor digits in its name is refused, and named."""
    write_run(tmp_path, num=3)
    save_file(trajectory(1)[0], str(tmp_path / "final.safetensors"))  # no metadata, no digits
    with pytest.raises(CheckpointError) as info:
        list_checkpoints(CheckpointSetSpec(uri=str(tmp_path)))
    assert "['final.safetensors']" in str(info.value) and "checkpoints.paths" in str(info.value)


def test_glob_does_not_descend_into_subfolders(tmp_path):
    """`glob` matches names in the folder itself: a newer checkpoint in a subfolder is not picked up."""
    write_run(tmp_path, num=3)
    write_run(tmp_path / "old-run", num=1, steps=[999_999])
    order = list_checkpoints(CheckpointSetSpec(uri=str(tmp_path)))
    assert [step for _, step in order] == [100, 200, 300]


def test_explicit_paths_keep_the_given_order(tmp_path):
    """With `paths`, the order given is the combination order, even against the files' steps."""
    write_run(tmp_path, num=3)
    names = ["ckpt-000300.safetensors", "ckpt-000100.safetensors", "ckpt-000200.safetensors"]
    order = list_checkpoints(CheckpointSetSpec(uri=str(tmp_path), paths=names))
    assert [uri.rsplit("/", 1)[-1] for uri, _ in order] == names


def test_explicit_paths_may_lack_steps(tmp_path):
    """Files without any step are fine when listed explicitly: their position is their order."""
    for name, state in zip(("a.safetensors", "b.safetensors"), trajectory(2)):
        save_file(state, str(tmp_path / name))
    order = list_checkpoints(CheckpointSetSpec(uri=str(tmp_path), paths=["b.safetensors", "a.safetensors"]))
    assert [(uri.rsplit("/", 1)[-1], step) for uri, step in order] == [
        ("b.safetensors", 0),
        ("a.safetensors", 1),
    ]


@pytest.mark.parametrize("output", ["{ckpt}", "{ckpt}/lcsc", "file://{ckpt}/x/y"])
def test_output_inside_checkpoints_is_refused(tmp_path, output):
    """`lcsc-ray validate` refuses an `output.uri` inside `checkpoints.uri` with exit code 2, naming both fields."""
    ckpt = tmp_path / "ckpts"
    spec = tmp_path / "s.yaml"
    spec.write_text(f"checkpoints:\n  uri: {ckpt}\noutput:\n  uri: {output.format(ckpt=ckpt)}\n")
    result = CliRunner().invoke(lcsc_main, ["validate", str(spec)])
    assert result.exit_code == 2, result.output
    assert "output.uri" in result.output and "checkpoints.uri" in result.output


def test_output_beside_checkpoints_is_accepted(tmp_path):
    """An output folder whose name merely starts like the checkpoint folder's is accepted."""
    spec = tmp_path / "s.yaml"
    spec.write_text(f"checkpoints:\n  uri: {tmp_path / 'ckpts'}\noutput:\n  uri: {tmp_path / 'ckpts-lcsc'}\n")
    result = CliRunner().invoke(lcsc_main, ["validate", str(spec)])
    assert "inside" not in result.output
