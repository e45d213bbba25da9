"""CheckFree / CheckFree+ pipeline training on Ray: stage actors that survive lost stages."""

# The SDK is imported on first use, not with the package: a Ray worker that runs one of the package's actors
# imports the package, and the SDK's job-submission client (Ray's dashboard modules) would cost it half a second.
__all__ = ["run_training", "submit_training"]


def __getattr__(name: str):
    if name in __all__:
        from checkfree_ray import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
