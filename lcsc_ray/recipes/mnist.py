"""The built-in MNIST recipes, by the import paths specs use (`lcsc_ray.recipes.mnist:ddim_sample`, ...).

- data:        `reference_images(split="holdout")`, `mnist_split(split)`; the fixed per-class split
               (400 train / 100 holdout per digit) is documented in `lcsc_ray.recipes.data`.
- DDPM:        `build_unet(**kwargs)`, `ddim_sample(model, n, seed, nfe, batch_size)`, `train_ddpm(config)`.
- consistency: `build_consistency_model(**kwargs)`, `consistency_sample(model, n, seed, nfe, batch_size)`,
               `train_consistency(config)` (distillation from the DDPM's EMA).
- FID:         `feature_network(**kwargs)` -> (B, d) features, `feature_network_accuracy(**kwargs)`.
- Ray:         `train_on_ray(kind, config)` runs either training as a Ray task.
"""

from __future__ import annotations

from lcsc_ray.recipes.checkpoints import list_checkpoints, load_weights
from lcsc_ray.recipes.consistency import ConsistencyModel, build_consistency_model, consistency_sample
from lcsc_ray.recipes.data import mnist_split, reference_images
from lcsc_ray.recipes.diffusion import ddim_sample
from lcsc_ray.recipes.features import FeatureNetConfig, feature_network, feature_network_accuracy
from lcsc_ray.recipes.train import (
    ConsistencyTrainConfig,
    DDPMTrainConfig,
    load_teacher,
    train_consistency,
    train_ddpm,
    train_on_ray,
)
from lcsc_ray.recipes.unet import UNet, UNetConfig, build_unet

__all__ = [
    "ConsistencyModel",
    "ConsistencyTrainConfig",
    "DDPMTrainConfig",
    "FeatureNetConfig",
    "UNet",
    "UNetConfig",
    "build_consistency_model",
    "build_unet",
    "consistency_sample",
    "ddim_sample",
    "feature_network",
    "feature_network_accuracy",
    "list_checkpoints",
    "load_teacher",
    "load_weights",
    "mnist_split",
    "reference_images",
    "train_consistency",
    "train_ddpm",
    "train_on_ray",
]
