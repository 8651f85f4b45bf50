"""Third-party plugins from entry points: one loader for every registry (runtimes, converters).

A plugin's failure is the plugin's, never the SDK's: each one that fails to import or to register costs one warning
line naming it, and the rest load.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable
from typing import Any

from edge_sdk.errors import first_line

__all__ = ["load_plugins"]


def load_plugins(group: str, kind: str, register: Callable[[Any], Any], log: logging.Logger) -> list[str]:
    """Call ``register(obj)`` for the object every entry point of ``group`` names; return the names loaded.

    ``kind`` ("runtime", "converter") is only for the warning line."""
    loaded: list[str] = []
    try:
        eps = importlib.metadata.entry_points(group=group)
    except Exception as exc:  # a corrupt dist-info somewhere on sys.path must not stop the SDK
        log.warning("cannot list %s plugins (%s): plugins skipped", group, first_line(exc))
        return loaded
    for ep in eps:
        try:
            register(ep.load())
            loaded.append(ep.name)
        except Exception as exc:  # any plugin failure is that plugin's, never the SDK's
            log.warning("%s plugin %r (%s) not loaded: %s: %s; fix or uninstall the package that provides it",
                        kind, ep.name, ep.value, type(exc).__name__, first_line(exc))
    return loaded
