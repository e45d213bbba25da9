"""CheckFree / CheckFree+ pipeline training on Ray: stage actors that survive lost stages."""

from checkfree_ray.sdk import run_training, submit_training

__all__ = ["run_training", "submit_training"]
