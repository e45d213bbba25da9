"""checkfree_ray package."""
