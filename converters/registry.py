"""The converter registry, keyed by (source framework, target format): the one list of what converts to what.

It fills when :mod:`edge_sdk.converters` is imported: every built-in converter module (:data:`BUILTIN_CONVERTERS`;
each registers its classes with :func:`register`), then every entry point of the group ``edge_sdk.converters``
(``pkg.module:Class`` registers that class; ``pkg.module`` is imported and registers itself). Registration keeps
classes, not instances, and converter modules import no framework at module level, so filling the registry
imports none (tests/test_core.py checks); a converter is instantiated on first :func:`get_converter`.

A plugin that fails to load gives one warning line (logger ``edge_sdk.converters``) and is left out.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from typing import Any

from edge_sdk._plugins import load_plugins
from edge_sdk.errors import ConversionError, UnsupportedConversionError
from edge_sdk.formats import Format, Framework

__all__ = [
    "BUILTIN_CONVERTERS",
    "ENTRY_POINT_GROUP",
    "get_converter",
    "load_builtin_converters",
    "load_entry_points",
    "register",
    "registered",
    "registered_classes",
    "target_formats",
    "unregister",
]

log = logging.getLogger("edge_sdk.converters")

ENTRY_POINT_GROUP = "edge_sdk.converters"
#: the built-in converter modules (edge_sdk.converters.<name>), imported when the package is
BUILTIN_CONVERTERS = (
    "torch_to_onnx", "keras_to_onnx", "onnx_to_onnx", "onnx_to_ort", "onnx_to_openvino",
    "keras_to_tflite", "torch_to_tflite", "onnx_to_tflite", "torch_to_coreml", "keras_to_coreml",
    "prebuilt", "tflite_to_onnx", "tflite_to_openvino", "onnx_to_web",
)

_CLASSES: dict[tuple[Framework, Format], type] = {}
_INSTANCES: dict[tuple[Framework, Format], Any] = {}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls: type | None = None, *, overwrite: bool = False) -> Any:
    """Class decorator (``@register`` or ``@register(overwrite=True)``): register a converter class for each of
    its ``sources`` and its ``target``.

    A different class for a registered (source, target) raises ConversionError unless ``overwrite``; the same
    class again (its module imported twice) is a no-op."""
    if cls is None:
        return lambda c: register(c, overwrite=overwrite)
    sources, target = getattr(cls, "sources", None), getattr(cls, "target", None)
    if not isinstance(sources, tuple) or not sources or not isinstance(target, Format) \
            or not callable(getattr(cls, "convert", None)):
        raise ConversionError(f"{cls!r} is not a converter: it needs a tuple `sources` of Framework, a Format "
                              "`target`, `precisions` and `convert()` (see edge_sdk.converters.Converter)")
    for src in sources:
        old = _CLASSES.get((src, target))
        if old is not None and not overwrite and _qualname(old) != _qualname(cls):
            raise ConversionError(f"a converter for {src.value} -> {target.value} is already registered "
                                  f"({old.__name__}); pass overwrite=True to replace it")
    for src in sources:
        _CLASSES[(src, target)] = cls
        _INSTANCES.pop((src, target), None)
    return cls


def unregister(source: Framework, target: Format) -> None:
    """Remove the converter for (source, target) (tests; a plugin replacing a built-in uses overwrite=True)."""
    _CLASSES.pop((source, target), None)
    _INSTANCES.pop((source, target), None)


def get_converter(source: Framework, target: Format) -> Any:
    """The converter for (source, target), or UnsupportedConversionError naming what exists."""
    key = (source, target)
    inst = _INSTANCES.get(key)
    if inst is None:
        try:
            cls = _CLASSES[key]
        except KeyError:
            have = sorted(t.value for (s, t) in _CLASSES if s == source)
            raise UnsupportedConversionError(
                f"no converter from {source.value} to {target.value}: {source.value} sources convert to "
                f"{', '.join(have) or 'nothing registered'}; register one with edge_sdk.converters.register"
            ) from None
        inst = _INSTANCES[key] = cls()
    return inst


def registered() -> dict[tuple[Framework, Format], Any]:
    """(source, target) -> converter instance, for every registered pair."""
    return {key: get_converter(*key) for key in _CLASSES}


def registered_classes() -> dict[tuple[Framework, Format], type]:
    """(source, target) -> converter class (nothing instantiated)."""
    return dict(_CLASSES)


def target_formats() -> list[Format]:
    """Every format some registered converter produces, in Format order."""
    have = {t for (_, t) in _CLASSES}
    return [f for f in Format if f in have]


def load_builtin_converters() -> None:
    """Import every built-in converter module (each registers itself; none imports a framework)."""
    for name in BUILTIN_CONVERTERS:
        importlib.import_module(f"edge_sdk.converters.{name}")


def load_entry_points(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every converter plugin of entry-point ``group`` (a class registers; a module registers on import);
    return the entry point names loaded. A failing plugin costs one warning line."""
    return load_plugins(group, "converter", lambda obj: register(obj) if isinstance(obj, type) else None, log)
