"""rayops package."""
