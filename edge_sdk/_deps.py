"""Lazy optional dependencies: detect without importing, import only when used, and ask their installed version.

The version comes from the distribution metadata (``importlib.metadata``), not from ``module.__version__``:
that needs no import of a heavy framework, and it is what pip installed (the distribution name, e.g.
``ai-edge-litert``, is not the module name ``ai_edge_litert``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType

from edge_sdk.errors import MissingDependencyError

__all__ = ["has_module", "installed_version", "require"]


def has_module(name: str) -> bool:
    """True when ``name`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


#: packages whose telemetry forks a process per send: beside JAX (loaded by litert-torch) a deadlock risk
_TELEMETRY_FORKS = frozenset({"openvino", "nncf"})


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the pip ``extra``."""
    if not has_module(module):
        raise MissingDependencyError(module.split(".")[0], extra, purpose)
    if module.split(".")[0] in _TELEMETRY_FORKS:  # for Python API users too, not only the CLI (edge_sdk/_quiet.py)
        from edge_sdk._quiet import no_openvino_telemetry

        no_openvino_telemetry()
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # installed but broken: say so, do not call it "missing"
        raise MissingDependencyError(
            module.split(".")[0], extra, f"{purpose}; the installed copy failed to import: {exc}"
        ) from exc


def installed_version(*dists: str) -> str | None:
    """The installed version of the first of the distributions ``dists`` that is installed, or None.

    Several names cover one module installed under different distributions (``onnxruntime``, ``onnxruntime-gpu``);
    provenance records write ``installed_version(...) or "unknown"``.
    """
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None
