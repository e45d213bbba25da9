"""Rules of a search spec that need a little computation: which built-in plug-ins belong together, and how many
seed vectors a search starts with. Pure functions, used by `schemas.search`'s validators."""

from __future__ import annotations

# The built-in model builders and samplers come in families whose model and sampler work only with each other:
# the MNIST recipe's (flat checkpoint files) and the diffusers adapter's (a UNet2DModel from its config.json).
MNIST_MODEL = "lcsc_ray.recipes.mnist:build_unet"
MNIST_SAMPLER = "lcsc_ray.recipes.mnist:ddim_sample"
DIFFUSERS_MODEL = "lcsc_ray.diffusers_checkpoints:build_model"
DIFFUSERS_SAMPLER = "lcsc_ray.diffusers_sampling:sample"
BUILTINS = {
    "MNIST recipe": {"model": MNIST_MODEL, "sampler": MNIST_SAMPLER},
    "diffusers": {"model": DIFFUSERS_MODEL, "sampler": DIFFUSERS_SAMPLER},
}


def builtin_family(target: str) -> str | None:
    """'MNIST recipe' or 'diffusers' for a built-in model builder or sampler, None for anything else."""
    if target.startswith("lcsc_ray.recipes."):
        return "MNIST recipe"
    if target.startswith(("lcsc_ray.diffusers_checkpoints:", "lcsc_ray.diffusers_sampling:")):
        return "diffusers"
    return None


def _allclose(x: tuple[float, ...], y: tuple[float, ...]) -> bool:
    """np.allclose(x, y) with its defaults (rtol=1e-5, atol=1e-8)."""
    return all(abs(a - b) <= 1e-8 + 1e-5 * abs(b) for a, b in zip(x, y, strict=True))


def seeds_of_two_checkpoints(ema_decays: list[float]) -> int:
    """How many distinct seed vectors the search starts with over two checkpoints, the smallest set (larger sets
    give as many or more). Each seed is then (a, 1 - a): a = 0 for the last checkpoint, the decay for ema@decay
    (`lcsc_ray.coefficients.ema_shaped`), 1/2 for the uniform soup; vectors that np.allclose merges (as
    `lcsc_ray.coefficients.seed_vectors` does, e.g. ema@0.5 and uniform here) count once."""
    kept: list[float] = []
    for a in (0.0, *ema_decays, 0.5):
        if not any(_allclose((a, 1 - a), (b, 1 - b)) for b in kept):
            kept.append(a)
    return len(kept)
