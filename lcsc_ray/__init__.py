"""LCSC on Ray: search linear combinations of saved checkpoints with Nevergrad through Ray Tune."""

from lcsc_ray.sdk import run_search, submit_search

__all__ = ["run_search", "submit_search"]
