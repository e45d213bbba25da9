"""One combination path: integer buffers copied (never combined), bfloat16 widened before scaling, exact export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lcsc_ray.checkpoints import Layout
from lcsc_ray.combine import check_non_float_equal, combine_flat, combine_into, combine_states
from lcsc_ray.export import combine_checkpoints
from schemas.errors import CheckpointError
from schemas.search import CheckpointSetSpec


def _write_set(directory, counters, num=3, dtype=torch.float32):
    """`num` checkpoints with a float weight and an int64 counter per file (counters[i] in file i)."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(num):
        state = {
            "weight": torch.randn(7, 5, generator=generator).to(dtype),
            "counter": torch.tensor(counters[i], dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
        }
        save_file(
            state,
            str(directory / f"ckpt-{100 * (i + 1):04d}.safetensors"),
            metadata={"step": str(100 * (i + 1))},
        )
    return CheckpointSetSpec(uri=str(directory))


def _coefficient_vectors(count: int, k: int) -> list[list[float]]:
    rng = np.random.default_rng(0)
    vectors = []
    for _ in range(count):
        free = rng.uniform(-2, 2, k - 1)
        vectors.append([*map(float, free), float(1 - free.sum())])
    return vectors


def test_integer_buffers_are_copied_from_the_last_checkpoint(tmp_path):
    """An int64 counter of 5 stays exactly 5 (int64) for every coefficient vector; floats are the weighted sum."""
    spec = _write_set(tmp_path / "run", counters=[5, 5, 5])
    files = sorted((tmp_path / "run").glob("*.safetensors"))
    for alphas in _coefficient_vectors(40, 3):
        state = combine_checkpoints(spec, alphas)
        assert state["counter"].dtype == torch.int64 and int(state["counter"]) == 5
        assert state["mask"].tolist() == [True, False, True]
        expected = sum(a * load_file(f)["weight"].double() for a, f in zip(alphas, files))
        torch.testing.assert_close(state["weight"].double(), expected, rtol=1e-5, atol=1e-5)


def test_integer_buffers_that_differ_are_refused(tmp_path):
    """Counters that differ across the set are an error naming the tensor and both checkpoints."""
    spec = _write_set(tmp_path / "run", counters=[5, 5, 6])
    with pytest.raises(CheckpointError, match=r"'counter' differs between checkpoints .*0100.* and .*0300"):
        combine_checkpoints(spec, [0.2, 0.3, 0.5])
    states = [load_file(f) for f in sorted((tmp_path / "run").glob("*.safetensors"))]
    layout = Layout.from_state_dict(states[0])
    flats = [layout.flatten(s) for s in states]
    with pytest.raises(CheckpointError, match="'counter' differs between checkpoints a and c"):
        check_non_float_equal(layout, flats, ["a", "b", "c"])


def test_flat_combination_copies_integer_segments(tmp_path):
    """The evaluators' flat route copies the counter from the last checkpoint, like the export route."""
    _write_set(tmp_path / "run", counters=[5, 5, 5])
    states = [load_file(f) for f in sorted((tmp_path / "run").glob("*.safetensors"))]
    layout = Layout.from_state_dict(states[0])
    flats = [layout.flatten(s) for s in states]
    check_non_float_equal(layout, flats, ["a", "b", "c"])
    for alphas in _coefficient_vectors(40, 3):
        out = combine_flat(torch.empty(layout.numel), flats, alphas, layout)
        views = layout.unflatten(out)
        assert float(views["counter"]) == 5.0 and views["mask"].tolist() == [1.0, 0.0, 1.0]
        exported = combine_states([(str(i), s) for i, s in enumerate(states)], alphas)
        torch.testing.assert_close(views["weight"], exported["weight"], rtol=1e-6, atol=1e-6)


def test_bfloat16_storage_combines_in_float32():
    """bfloat16 inputs with coefficients of magnitude ~6 are widened before scaling: float32 accuracy."""
    generator = torch.Generator().manual_seed(1)
    values = [torch.randn(4096, generator=generator).to(torch.bfloat16) for _ in range(3)]
    alphas = [6.25, -5.75, 0.5]
    expected = sum(a * v.double() for a, v in zip(alphas, values))
    out = torch.empty(4096)
    combine_into(out, [v.view(torch.uint16).numpy() for v in values], alphas)
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    exported = combine_states([(str(i), {"w": v}) for i, v in enumerate(values)], alphas)["w"]
    assert exported.dtype == torch.float32
    torch.testing.assert_close(exported.double(), expected, rtol=1e-6, atol=1e-6)


def test_combine_cli_writes_the_same_bytes_twice(tmp_path):
    """`lcsc-ray combine` output is a pure function of files and coefficients (no time, no randomness)."""
    from lcsc_ray.cli import main

    _write_set(tmp_path / "run", counters=[3, 3, 3])
    (tmp_path / "coefficients.json").write_text("[0.25, -0.5, 1.25]")
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        result = CliRunner().invoke(
            main,
            [
                "combine",
                "--coefficients",
                str(tmp_path / "coefficients.json"),
                "--checkpoints",
                str(tmp_path / "run"),
                "--out",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    assert int(load_file(tmp_path / "a.safetensors")["counter"]) == 3
