"""User plug-ins by import path ('package.module:callable'): resolve them and call them with their kwargs.

Every failure of a plug-in (its module does not import, the attribute is missing, the call raises) becomes a
`PluginError` naming the plug-in, the spec field when known, and the plug-in's own exception on one line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from schemas.common import PluginSpec
from schemas.errors import LcscCheckfreeError, PluginError

__all__ = ["PluginError", "build", "check_importable", "resolve"]


def _one_line(exc: BaseException, limit: int = 300) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:limit]}"


def _where(target: str, field: str | None) -> str:
    return f"plug-in {target!r}" + (f" (`{field}.target`)" if field else "")


def resolve(target: str, field: str | None = None) -> Callable:
    """Import 'pkg.mod:attr' (attr may be dotted) and return the callable it names."""
    where = _where(target, field)
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise PluginError(f"{where} must look like 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise PluginError(
            f"{where}: module {module_name!r} cannot be imported ({exc}); "
            "check the spelling and that its package is installed on every Ray node"
        ) from exc
    except Exception as exc:
        raise PluginError(f"{where}: importing {module_name!r} failed ({_one_line(exc)})") from exc
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            available = sorted(name for name in dir(obj) if not name.startswith("_"))[:20]
            raise PluginError(
                f"{where}: {module_name!r} has no attribute {attr_path!r}; "
                f"public names there include {available}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise PluginError(f"{where} is a {type(obj).__name__}, not a callable")
    return obj


def build(plugin: PluginSpec, field: str | None = None, **extra: Any) -> Any:
    """Resolve `plugin.target` and call it with `plugin.kwargs` (plus `extra`, overridden by the spec); an
    error raised by the call is a `PluginError` naming the plug-in and `field`."""
    fn = resolve(plugin.target, field)
    try:
        return fn(**{**extra, **plugin.kwargs})
    except LcscCheckfreeError:
        raise  # already names what is wrong (e.g. a weights file the plug-in reads)
    except Exception as exc:
        where = _where(plugin.target, field)
        raise PluginError(
            f"{where} failed to build with kwargs {sorted(plugin.kwargs)} ({_one_line(exc)})"
        ) from exc


def check_importable(plugins: Mapping[str, PluginSpec]) -> None:
    """Import every plug-in (field name -> spec) without building it; the first failure is a `PluginError`."""
    for field, plugin in plugins.items():
        resolve(plugin.target, field)
