"""LCSC on Ray: search linear combinations of saved checkpoints with Nevergrad through Ray Tune."""

# The SDK is imported on first use, not with the package: a Ray worker that runs one of the package's actors
# imports the package, and the SDK's job-submission client (Ray's dashboard modules) would cost it half a second.
__all__ = ["run_search", "submit_search"]


def __getattr__(name: str):
    if name in __all__:
        from lcsc_ray import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
