"""lcsc_ray package."""
