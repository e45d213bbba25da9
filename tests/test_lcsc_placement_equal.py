"""Every checkpoint placement (node, sharded, stream) gives the same combined weights, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lcsc_ray.checkpoints import load_checkpoint_set
from lcsc_ray.placement import choose
from lcsc_ray.placement_sharded import place_sharded, shard_bounds
from schemas.search import CheckpointSetSpec

K = 4


def _write_set(directory, num=K):
    """Checkpoints with a tensor larger than one combination chunk (300k values), odd shapes, a float16 tensor,
    an int64 counter and a bool mask; plus an EMA file."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    for i in range(num + 1):
        state = {
            "big.weight": torch.randn(600, 500, generator=generator) * 3,
            "a.bias": torch.randn(7, generator=generator),
            "half": torch.randn(13, 3, generator=generator).half(),
            "counter": torch.tensor(5, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "z.weight": torch.randn(1001, 3, generator=generator),
        }
        name = f"ckpt-{100 * (i + 1):04d}.safetensors" if i < num else "ema.safetensors"
        save_file(state, str(directory / name))
    return directory


def _spec(root, storage_dtype: str, placement: str) -> CheckpointSetSpec:
    return CheckpointSetSpec(
        uri=str(root),
        glob="ckpt-*.safetensors",
        ema_uri=str(root / "ema.safetensors"),
        storage_dtype=storage_dtype,
        placement=placement,
    )


def _bits(placed, coefficients) -> torch.Tensor:
    out = torch.full((placed.layout.numel,), float("nan"))
    placed.open(out.device)
    placed.combine_into(out, coefficients)
    return out.view(torch.int32).clone()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_every_placement_combines_bit_for_bit_like_node(tmp_path, ray_local, storage_dtype):
    """Random coefficient vectors (and the EMA) combined through node, sharded (one and three shards) and
    stream are equal bit for bit; the modes really keep the set where they say."""
    root = _write_set(tmp_path / "run")
    sets = {
        mode: load_checkpoint_set(_spec(root, storage_dtype, mode)) for mode in ("node", "sharded", "stream")
    }
    assert [s.choice.mode for s in sets.values()] == ["node", "sharded", "stream"]
    assert len(sets["node"].refs) == K and not sets["sharded"].refs and not sets["stream"].refs
    node = ray_local.get_runtime_context().get_node_id()
    three = sets["sharded"]
    three.placement = place_sharded(three.uris, three.names, None, three.layout, [node] * 3)
    assert len(three.placement.shards) == 3
    placed = {mode: s.placed() for mode, s in sets.items()}
    rng = np.random.default_rng(0)
    vectors = [list(map(float, rng.uniform(-2, 2, K))) for _ in range(4)] + [[0.0] * (K - 1) + [1.0], None]
    for coefficients in vectors:
        reference = _bits(placed["node"], coefficients)
        for mode in ("sharded", "stream"):
            assert torch.equal(_bits(placed[mode], coefficients), reference), (mode, coefficients)
    moved = placed["sharded"].combine_into(torch.empty(three.layout.numel), vectors[0])
    assert moved["moved_bytes"] == three.layout.numel * 4  # one float32 model crosses into the evaluator


def test_shards_are_balanced_and_cut_at_tensor_boundaries_when_near():
    """Shards cover the vector once; a cut near a tensor boundary moves onto it, one inside a huge tensor stays."""
    from lcsc_ray.layout import Layout

    layout = Layout(["a", "b", "c"], [(100,), (5,), (95,)], ["float32"] * 3, [0, 100, 105], 200)
    bounds = shard_bounds(layout, 2)
    assert bounds == [(0, 100), (100, 200)]
    big = Layout(["a"], [(1000,)], ["float32"], [0], 1000)
    assert shard_bounds(big, 4) == [(0, 250), (250, 500), (500, 750), (750, 1000)]


def test_auto_placement_follows_the_object_stores():
    """auto: node when every node holds the set, sharded when only all together do, else stream; torch files
    stay on node; the reason names the sizes."""
    gib = 1024**3
    assert choose("auto", 1 * gib, [4 * gib, 4 * gib], True).mode == "node"
    assert choose("auto", 5 * gib, [4 * gib, 4 * gib, 4 * gib], True).mode == "sharded"
    stream = choose("auto", 20 * gib, [4 * gib, 4 * gib], True)
    assert stream.mode == "stream" and "20.00 GiB" in stream.reason
    assert choose("auto", 5 * gib, [4 * gib, 4 * gib], False).mode == "node"
    assert choose("stream", 1, [4 * gib], True).mode == "stream"
