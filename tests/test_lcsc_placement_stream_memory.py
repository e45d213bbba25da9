"""`stream` combination in bounded memory: the files' pages leave the process window by window; a file changed
under a running search is an error, not different weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lcsc_ray.combine import combine_naive
from lcsc_ray.placement import StreamWeights
from lcsc_ray.placement_files import header_layout
from schemas.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
K = 8
NUMEL = 6_000_000  # 24 MB per checkpoint: the set is 8 models' worth

MEASURE = """
import json, resource, sys, torch
from lcsc_ray.placement import StreamWeights
from lcsc_ray.placement_files import header_layout
paths = sys.argv[1:]
layout = header_layout(paths[0], None, "float32")
weights = StreamWeights(paths, None, layout)
out = torch.zeros(layout.numel)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights.combine_into(out, [1.0 / len(paths)] * len(paths))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - before, "model": layout.nbytes, "sum": float(out.double().sum())}))
"""


def _write(directory: Path, numel: int, num: int, seed: int = 0) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths = []
    for index in range(num):
        state = {"a.weight": torch.randn(numel - 1000, generator=generator), "b": torch.randn(1000)}
        path = directory / f"ckpt-{index:04d}.safetensors"
        save_file(state, str(path))
        paths.append(str(path))
    return paths


@pytest.mark.timeout(300)
def test_stream_holds_about_one_model_not_the_set(tmp_path):
    """Combining 8 checkpoints of 24 MB grows the process's peak resident memory by well under 2.5 models
    (mapping every page read until the end would add the whole 192 MB set)."""
    paths = _write(tmp_path, NUMEL, K)
    run = subprocess.run(
        [sys.executable, "-c", MEASURE, *paths],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["growth"] < 1.0 * measured["model"], measured
    arrays = [np.concatenate([t.numpy() for t in _load(p).values()]) for p in paths]
    assert measured["sum"] == pytest.approx(float(combine_naive(arrays, [1.0 / K] * K).sum()), rel=1e-4)


def _load(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(sorted(load_file(path).items()))


def test_a_file_changed_under_stream_is_an_error(tmp_path):
    """A checkpoint rewritten with another shape after the set was opened: the combination names the file and
    says to restart, instead of combining other weights."""
    paths = _write(tmp_path, 5000, 3)
    weights = StreamWeights(paths, None, header_layout(paths[0], None, "float32"))
    out = torch.empty(5000)
    weights.combine_into(out, [0.2, 0.3, 0.5])
    save_file({"a.weight": torch.randn(3000), "b": torch.randn(1000)}, paths[1])
    with pytest.raises(CheckpointError, match=r"ckpt-0001.*'a.weight'.*changed after the search started"):
        weights.combine_into(out, [0.2, 0.3, 0.5])
