"""The runtime registry: the one list of inference runtimes every other list derives from.

It fills when :mod:`edge_sdk.runtimes` is imported: the built-in runtimes, then every entry point of the
group ``edge_sdk.runtimes`` (a third-party package declares ``[project.entry-points."edge_sdk.runtimes"]
echo = "my_pkg:EchoRuntime"`` and needs no edit anywhere in the SDK). A plugin that fails to load gives one
warning line (logger ``edge_sdk.runtimes``) and is left out: a broken plugin never stops the agent.

A runtime class carries its own facts, read here with defaults so a minimal third-party class works too:

- ``name``, ``formats``, ``extra`` (the pip extra that installs it) — the :class:`~edge_sdk.runtimes.Runtime`
  protocol;
- ``rank`` — its place in the default runtime order (lower first; ties keep registration order);
- ``bench_modules`` — the modules ``Runtime.load`` imports, imported by the benchmark worker before it takes the
  memory baseline (the first one that imports is enough);
- ``plot_markers`` — (format, matplotlib marker) pairs for the benchmark's size/latency plot.

Derived here, and nowhere else: :func:`default_order`, :func:`bench_modules`, :func:`plot_markers`, and the
name -> runtime mapping :data:`RUNTIMES` (a live view, in default order) used for config / profile validation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

from edge_sdk._plugins import load_plugins
from edge_sdk.errors import EdgeSDKError, InferenceError

__all__ = [
    "DEFAULT_RANK",
    "ENTRY_POINT_GROUP",
    "RUNTIMES",
    "bench_modules",
    "default_order",
    "get_runtime",
    "load_entry_points",
    "plot_markers",
    "register_runtime",
    "unregister_runtime",
]

log = logging.getLogger("edge_sdk.runtimes")

ENTRY_POINT_GROUP = "edge_sdk.runtimes"
DEFAULT_RANK = 100  # a plugin without a rank comes after the built-ins

_REGISTRY: dict[str, Any] = {}  # name -> runtime instance, in registration order


def _rank(rt: Any) -> int:
    rank = getattr(rt, "rank", DEFAULT_RANK)
    return rank if isinstance(rank, int) else DEFAULT_RANK


def _ordered() -> list[Any]:
    regs = list(_REGISTRY.values())
    return sorted(regs, key=lambda rt: (_rank(rt), regs.index(rt)))


class _RuntimeView(Mapping[str, Any]):
    """Read-only name -> runtime mapping over the registry, iterating in default preference order.

    ``name in RUNTIMES`` and ``", ".join(RUNTIMES)`` therefore always reflect what is registered now, plugins
    included."""

    def __getitem__(self, name: str) -> Any:
        return _REGISTRY[name]

    def __iter__(self) -> Iterator[str]:
        return iter([rt.name for rt in _ordered()])

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __repr__(self) -> str:
        return f"RUNTIMES({list(self)})"


#: every registered runtime by name, in default preference order (live)
RUNTIMES: Mapping[str, Any] = _RuntimeView()


def register_runtime(runtime: Any, *, overwrite: bool = False) -> Any:
    """Register a runtime class (instantiated here) or instance; usable as a class decorator.

    A second runtime under a registered name raises unless ``overwrite``; registering the same class again is a
    no-op (a module imported twice)."""
    inst = runtime() if isinstance(runtime, type) else runtime
    name = getattr(inst, "name", None)
    if not isinstance(name, str) or not name or not isinstance(getattr(inst, "formats", None), tuple) \
            or not callable(getattr(inst, "load", None)):
        raise EdgeSDKError(f"{runtime!r} is not a runtime: it needs a str `name`, a tuple `formats` and `load()` "
                           "(see edge_sdk.runtimes.Runtime)")
    old = _REGISTRY.get(name)
    if old is not None and not overwrite and _qualname(old) != _qualname(inst):
        raise EdgeSDKError(f"a runtime named {name!r} is already registered ({_qualname(old)}): pick another name "
                           "or pass overwrite=True to replace it")
    _REGISTRY[name] = inst
    return runtime


def unregister_runtime(name: str) -> None:
    """Remove ``name`` from the registry (tests; a plugin replacing a built-in uses overwrite=True instead)."""
    _REGISTRY.pop(name, None)


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def get_runtime(name: str) -> Any:
    """The runtime registered under ``name``; InferenceError naming the choices otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InferenceError(f"unknown runtime {name!r}: choose from {', '.join(RUNTIMES)}") from None


def default_order() -> tuple[str, ...]:
    """Runtime names in default preference order (by ``rank``, then registration order)."""
    return tuple(RUNTIMES)


def bench_modules() -> dict[str, tuple[str, ...]]:
    """name -> the modules that runtime imports (for the benchmark worker's memory baseline)."""
    return {rt.name: tuple(getattr(rt, "bench_modules", ())) for rt in _ordered()}


def plot_markers() -> dict[str, str]:
    """format -> matplotlib marker, from every runtime's ``plot_markers`` (the first runtime in order wins)."""
    out: dict[str, str] = {}
    for rt in _ordered():
        for fmt, marker in dict(getattr(rt, "plot_markers", {}) or {}).items():
            out.setdefault(str(fmt), marker)
    return out


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Register every runtime of entry-point ``group`` (``pkg.module:Class`` or an instance); return the runtime
    names added. One that fails to import, is not a runtime, or clashes with a registered name costs one warning
    line and is skipped."""
    added: list[str] = []

    def _register(obj: Any) -> None:
        before = set(_REGISTRY)
        register_runtime(obj)
        added.extend(n for n in _REGISTRY if n not in before)

    load_plugins(group, "runtime", _register, log)
    return added
