"""User plug-ins by import path ('package.module:callable'): resolve them and call them with their kwargs."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from schemas.common import PluginSpec
from schemas.errors import LcscCheckfreeError


class PluginError(LcscCheckfreeError, ImportError):
    """A plug-in's module or attribute cannot be imported; the message names the target."""


def resolve(target: str) -> Callable:
    """Import 'pkg.mod:attr' (attr may be dotted) and return the callable it names."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise PluginError(f"plug-in {target!r} must look like 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PluginError(
            f"plug-in {target!r}: module {module_name!r} cannot be imported ({exc}); "
            "check the spelling and that its package is installed on every Ray node"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            available = sorted(name for name in dir(obj) if not name.startswith("_"))[:20]
            raise PluginError(
                f"plug-in {target!r}: {module_name!r} has no attribute {attr_path!r}; "
                f"public names there include {available}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"plug-in {target!r} is a {type(obj).__name__}, not a callable")
    return obj


def build(plugin: PluginSpec, **extra: Any) -> Any:
    """Resolve `plugin.target` and call it with `plugin.kwargs` (plus `extra`, overridden by the spec)."""
    return resolve(plugin.target)(**{**extra, **plugin.kwargs})
