"""Lazy optional dependencies: detect without importing, import only when used."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from edge_sdk.errors import MissingDependencyError

__all__ = ["has_module", "require"]


def has_module(name: str) -> bool:
    """True when ``name`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip ``extra``."""
    if not has_module(module):
        raise MissingDependencyError(module.split(".")[0], extra, purpose)
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # installed but broken: say so, do not call it "missing"
        raise MissingDependencyError(
            module.split(".")[0], extra, f"{purpose}; the installed copy failed to import: {exc}"
        ) from exc
