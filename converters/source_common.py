"""What every source model shares: the input shape and dtype arguments, their checks, and the SourceModel base.

The framework loaders (:mod:`.source_torch`, :mod:`.source_keras`, :mod:`.source_onnx`, and the as-is files of
:mod:`.prebuilt`) read their inputs differently but take the user's ``--input-shape`` / ``--input-dtype`` the same
way, so the parsing, the "that input does not exist" check and the pinning of a dynamic batch live here once and
every framework answers with the same one-line errors.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.errors import SourceModelError
from edge_sdk.formats import Framework

__all__ = ["InputDtypes", "ShapeSpec", "SourceBase", "check_names", "check_shape", "flatten", "given_shape",
           "guess_layout", "import_class", "output_names", "pin_shapes", "resolve_dtypes"]

#: One shape (the first input's) or ``{input name: shape}``.
ShapeSpec = Sequence[int] | Mapping[str, Sequence[int]]
#: ``{input name: numpy dtype name}`` or one dtype name per input, in order.
InputDtypes = Mapping[str, str] | Sequence[str]


def guess_layout(shape: list[int]) -> str:
    """NCHW / NHWC for a 4-d image-like shape by where its channel axis (1, 3 or 4 wide) is; "" otherwise."""
    if len(shape) == 4:
        if shape[1] in (1, 3, 4) and shape[3] not in (1, 3, 4):
            return "NCHW"
        if shape[3] in (1, 3, 4):
            return "NHWC"
    return ""


def check_shape(shape: Any) -> list[int]:
    """``shape`` as a list of positive ints, or a SourceModelError with an example."""
    try:
        out = [int(s) for s in shape]
    except (TypeError, ValueError):
        raise SourceModelError(f"input shape {shape!r} is not a list of integers: use e.g. 1,3,224,224") from None
    if not out or any(s <= 0 for s in out):
        raise SourceModelError(f"input shape {out} must be positive integers: use e.g. 1,3,224,224")
    return out


def given_shape(spec: ShapeSpec | None, k: int, name: str) -> list[int] | None:
    """The shape the user gave for input ``k`` called ``name`` (None when none was given for it)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return check_shape(spec[name]) if name in spec else None
    return check_shape(spec) if k == 0 else None


def check_names(spec: ShapeSpec | Mapping[str, Any] | None, names: list[str], what: str) -> None:
    """Refuse a ``{name: ...}`` argument (``what`` is its flag) naming an input the model does not have."""
    if isinstance(spec, Mapping):
        unknown = [n for n in spec if n not in names]
        if unknown:
            raise SourceModelError(f"{what} names {unknown} that the model does not have: its inputs are "
                                   f"{names}")


def pin_shapes(shapes: Sequence[Sequence[int | None]], names: list[str], given: ShapeSpec | None,
               what: str) -> list[list[int]]:
    """Concrete input shapes from the model's (None = dynamic): the given ones, batch 1 for a dynamic batch.

    ``what`` names the model kind in the errors ("Keras", "SavedModel", "TFLite"). A given shape must have the
    model's rank and agree with every static axis; any other dynamic axis needs ``--input-shape``.
    """
    check_names(given, names, "--input-shape")
    out = []
    for k, (model_dims, name) in enumerate(zip(shapes, names, strict=True)):
        dims = list(model_dims)
        want = given_shape(given, k, name)
        if want is not None:
            if len(want) != len(dims) or any(d not in (None, w) for d, w in zip(dims, want, strict=True)):
                raise SourceModelError(f"--input-shape {want} does not fit the {what} input {name!r} "
                                       f"{['?' if d is None else d for d in dims]}: pass a shape that matches it")
            dims = list(want)
        if dims and dims[0] is None:
            dims[0] = 1
        if any(d is None for d in dims):
            raise SourceModelError(f"{what} input {name!r} has dynamic dimensions "
                                   f"{['?' if d is None else d for d in dims]}: pass --input-shape with concrete sizes")
        out.append([int(d) for d in dims])  # type: ignore[arg-type]
    return out


def resolve_dtypes(spec: InputDtypes | None, names: list[str], default: list[str] | None = None) -> list[str]:
    """numpy dtype names per input: the model's ``default`` (float32 when unknown) overridden by ``spec``."""
    out = list(default or ["float32"] * len(names))
    if spec is None:
        return out
    if isinstance(spec, str):
        spec = [spec]
    check_names(spec, names, "--input-dtype")
    items = spec.items() if isinstance(spec, Mapping) else zip(names, spec, strict=False)
    for name, dt in items:
        try:
            out[names.index(name)] = np.dtype(str(dt)).name
        except TypeError:
            raise SourceModelError(f"--input-dtype {dt!r} for {name!r} is not a numpy dtype: use e.g. int64, "
                                   "int32, float32") from None
    return out


def flatten(out: Any) -> list[Any]:
    """The leaves of nested dicts / lists / tuples, in order: how a model's outputs become a flat list."""
    if isinstance(out, dict):
        return [v for k in out for v in flatten(out[k])]
    if isinstance(out, (list, tuple)):
        return [v for o in out for v in flatten(o)]
    return [out]


def output_names(out: Any, prefix: str = "") -> list[str] | None:
    """Names for outputs returned as a dict (its keys, nested keys joined with '.'); None otherwise."""
    if not isinstance(out, dict):
        return None
    names: list[str] = []
    for k, v in out.items():
        sub = output_names(v, f"{prefix}{k}.")
        if sub is not None:
            names += sub
        elif isinstance(v, (list, tuple)):
            names += [f"{prefix}{k}_{i}" for i in range(len(flatten(v)))]
        else:
            names.append(f"{prefix}{k}")
    return names


def import_class(spec: str, what: str = "--model-class") -> Any:
    """Import ``package.module:Class``; raise SourceModelError naming ``what`` (the flag it came from) on failure."""
    mod_name, _, cls_name = spec.partition(":")
    if not mod_name or not cls_name:
        raise SourceModelError(f"{what} {spec!r} must look like package.module:ClassName")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise SourceModelError(f"cannot import {mod_name!r} for {what} ({exc}): make sure it is on "
                               "PYTHONPATH") from None
    try:
        return getattr(module, cls_name)
    except AttributeError:
        raise SourceModelError(f"module {mod_name!r} has no class {cls_name!r} ({what})") from None


class SourceBase:
    """What the converters read of any source: input names / shapes / dtypes, output names, layout, provenance."""

    framework: Framework
    path: Path | None = None
    sha256: str | None = None
    input_names: list[str]
    input_shapes: list[list[int]]
    output_names: list[str]
    input_dtypes: list[str]
    layout: str = ""

    def describe(self) -> dict[str, Any]:
        """The manifest's ``source`` entry."""
        return {"framework": self.framework.value, "file": self.path.name if self.path else None,
                "sha256": self.sha256, "kind": type(self).__name__}

    def close(self) -> None:
        """Remove temporary files made while loading."""
