"""CheckFree / CheckFree+ pipeline training on Ray: stage actors that survive lost stages."""

from checkfree_ray.train import run_training

__all__ = ["run_training"]
