"""Symbolic ONNX input axes: read them, pin them to concrete sizes, keep the ones the user wants dynamic.

Real ONNX models declare symbolic batch, height, width or sequence axes (``[?, 3, ?, ?]``). onnx2tf, ONNX
Runtime's quantization pre-processing, TFLite int8 and Core ML need static shapes, so the source is pinned once
(from ``--input-shape``) into a copy that every static-shape tool reads; the user's file is never modified.
Shape inference on the pinned copy is tried and, when it fails (custom domains, ``If`` branches, ops newer than
the inference code), the copy keeps its pinned inputs without inferred intermediate shapes — never a crash.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_sdk._deps import require
from edge_sdk.errors import first_line

__all__ = ["AXIS_NAMES", "dynamic_axes", "input_dims", "pin_onnx", "resolve_dynamic_axes"]

#: Names ``--dynamic`` accepts, with the axis they mean per input layout (integers are accepted too).
AXIS_NAMES = ("batch", "height", "width", "sequence", "channels")


def input_dims(model: Any) -> list[tuple[str, list[int | str | None], int]]:
    """(name, dims, onnx elem_type) of each graph input that is not an initializer; a symbolic dim is its
    ``dim_param`` string (or None when it has neither value nor name)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims: list[int | str | None] = []
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            else:
                dims.append(d.dim_param or None)
        out.append((inp.name, dims, int(inp.type.tensor_type.elem_type)))
    return out


def dynamic_axes(dims: Sequence[int | str | None]) -> list[int]:
    """Indices of the symbolic axes of one input."""
    return [i for i, d in enumerate(dims) if not isinstance(d, int)]


def resolve_dynamic_axes(names: Sequence[str], shape: Sequence[int], layout: str) -> set[int]:
    """Axis indices meant by ``--dynamic`` names (batch, height, width, sequence, channels, or integers)."""
    rank = len(shape)
    where = {"batch": 0}
    if layout == "NCHW" and rank == 4:
        where.update(channels=1, height=2, width=3)
    elif layout == "NHWC" and rank == 4:
        where.update(height=1, width=2, channels=3)
    elif rank >= 2:
        where.update(sequence=1)
    out: set[int] = set()
    for name in names:
        name = name.strip().lower()
        if name.lstrip("-").isdigit():
            axis = int(name) % rank
        elif name in where:
            axis = where[name]
        else:
            continue  # a name that does not apply to this input (e.g. height on a 2-D input)
        out.add(axis)
    return out


def pin_onnx(src: Path, out: Path, shapes: Mapping[str, Sequence[int]],
             keep: Mapping[str, set[int]] | None = None) -> list[str]:
    """Write ``src`` to ``out`` with every input axis set to ``shapes[name]`` except the axes in ``keep``.

    Returns notes for the manifest (what was pinned, and whether shape inference ran).
    """
    onnx = require("onnx", "onnx", "pinning ONNX input shapes")
    model = onnx.load(str(src))
    keep = keep or {}
    pinned: list[str] = []
    for inp in model.graph.input:
        if inp.name not in shapes:
            continue
        want = list(shapes[inp.name])
        dims = inp.type.tensor_type.shape.dim
        before = ["?" if not (d.HasField("dim_value") and d.dim_value > 0) else d.dim_value for d in dims]
        for i, d in enumerate(dims):
            if i in keep.get(inp.name, set()):
                if not d.dim_param and not (d.HasField("dim_value") and d.dim_value > 0):
                    d.dim_param = f"{inp.name}_{i}"
                elif d.HasField("dim_value"):
                    d.Clear()
                    d.dim_param = f"{inp.name}_{i}"
                continue
            d.Clear()
            d.dim_value = int(want[i])
        if "?" in before or keep.get(inp.name):
            after = ["?" if i in keep.get(inp.name, set()) else want[i] for i in range(len(want))]
            pinned.append(f"{inp.name} {before} -> {after}")
    notes = [f"input shapes pinned: {'; '.join(pinned)}"] if pinned else []
    # intermediate shapes recorded for the symbolic sizes are stale now: infer them again from the inputs
    stale = list(model.graph.value_info)
    del model.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        model = inferred
        notes.append("shapes re-inferred with onnx.shape_inference")
    except Exception as exc:  # any failure of the inference falls back to the pinned inputs only
        model.graph.value_info.extend(v for v in stale if all(d.HasField("dim_value") for d in
                                                              v.type.tensor_type.shape.dim))
        first = first_line(exc, 160)
        notes.append(f"shape inference failed after pinning ({first}): inputs pinned only")
    onnx.save_model(model, str(out))
    return notes
