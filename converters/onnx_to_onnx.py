"""ONNX -> ONNX: fp32 is a checked copy of the source file; fp16 / dynamic / int8 come from the quantizers.

The user's file is never modified. A source whose weights live in external data files is written
back as one self-contained ``.onnx`` so the bundle holds a single file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edge_sdk._deps import require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, register
from edge_sdk.converters.onnx_common import fp32_onnx_draft, onnx_versions
from edge_sdk.converters.onnx_quantize import OnnxExporter
from edge_sdk.errors import ConversionError
from edge_sdk.formats import Framework

__all__ = ["OnnxToOnnx", "copy_onnx"]


def _has_external_data(onnx: Any, path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def copy_onnx(src: Path, out: Path) -> bool:
    """Check ``src`` with onnx.checker and copy it to ``out`` as one file; True when external data was inlined."""
    onnx = require("onnx", "onnx", "checking ONNX models")
    from google.protobuf.message import DecodeError  # protobuf is a dependency of onnx

    try:
        onnx.checker.check_model(str(src))
        external = _has_external_data(onnx, src)
        if external:
            onnx.save_model(onnx.load(str(src)), str(out), save_as_external_data=False)
        else:
            shutil.copyfile(src, out)
    except (onnx.checker.ValidationError, DecodeError, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"{src.name} is not a valid ONNX model ({first}): re-export it; the file may be "
                              "truncated, corrupt, or missing its external data file") from None
    return external


@register
class OnnxToOnnx(OnnxExporter):
    """ONNX source -> ONNX artifacts (fp32 copy; fp16 / dynamic / int8 derived from it)."""

    sources = (Framework.ONNX,)

    def export_fp32(self, ctx: ConversionContext, out: Path) -> ArtifactDraft:
        """Write the fp32 ONNX file."""
        src = ctx.source
        src_path = Path(getattr(src, "dynamic_model", None) or (src.model if src.model is not None else src.path))
        inlined = copy_onnx(src_path, out)
        pinned = list(getattr(src, "pin_notes", []))
        notes = ["the source ONNX file, checked with onnx.checker"
                 + ("; external weight data inlined into one file" if inlined else
                    ", with its symbolic input axes pinned" if pinned else ", copied unchanged")]
        notes += pinned
        if src_path != Path(src.model):
            notes.append("axes kept dynamic as asked (--dynamic); validated at the pinned shape")
        return fp32_onnx_draft(out, onnx_versions(), notes, extra="onnx")
