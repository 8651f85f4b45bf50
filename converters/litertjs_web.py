"""The LiteRT.js web artifact (``--to web --web-runtime litertjs``): the source's ``.tflite`` run in the browser.

Measured on MobileNetV2 in headless Chromium (benchmarks/web_litertjs.py, issue 17): LiteRT.js 2.5.3 (XNNPack,
relaxed SIMD) ran fp32 1.7x faster than onnxruntime-web 1.31.1 at 1 thread and loaded 2x faster, with the same
outputs (cosine 1.000000 vs the source). onnxruntime-web stays the default web runtime: its model *is* the ONNX
artifact (every source, every op the SDK validates); this one needs a ``.tflite`` route for the source.

The ``.tflite`` is made here by the same routes as the ``tflite`` target (litert-torch, onnx2tf, ...; tried in
order, each failure kept for the one-line error), in a context of its own whose options ask for **float
inputs/outputs** (``tflite_int8_io = False``): LiteRT.js has float32 / int32 / uint8 tensors only, and an int8-I/O
model fails in ``loadAndCompile`` with "Element type INT8 is not supported.". A route that still returns int8 I/O
(litert-torch's PT2E fallback) gets QUANTIZE / DEQUANTIZE ops at its boundary (converters/tflite_quantize.py).
The folder is then written like the ONNX Runtime Web one (converters/onnx_to_web.py) with the tensor names of the
model's signature (what LiteRT.js reports), and validated in Chromium by the ``litertjs`` runtime.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_sdk._deps import require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, produce
from edge_sdk.converters.routes import candidate_routes, failure_reason, route_context, routes_with_precision
from edge_sdk.converters.web_vendor import LITERTJS_CORE
from edge_sdk.errors import ConversionError, UnsupportedConversionError
from edge_sdk.formats import Format, Precision

__all__ = ["LITERTJS_DTYPES", "build_litertjs_folder", "signature_specs", "tflite_for_web"]

#: tensor element types LiteRT.js 2.5.3 accepts at a model's inputs and outputs
LITERTJS_DTYPES = ("float32", "int32", "uint8")
_KEY = "options:web-litertjs"


def _context(ctx: ConversionContext) -> ConversionContext:
    """``ctx`` with float-I/O TFLite options, sharing the source and its ONNX exports (made once)."""
    sub = ctx.derived.get(_KEY)
    if sub is None:
        sub = ConversionContext(ctx.source, ctx.workdir / "web_litertjs", calibration=ctx.calibration,
                                options=replace(ctx.options, tflite_int8_io=False))
        sub._onnx, sub._onnx_errors = ctx._onnx, ctx._onnx_errors
        sub.owns_source = False
        ctx.derived[_KEY] = sub
    return sub


def tflite_for_web(ctx: ConversionContext, precision: Precision) -> tuple[ArtifactDraft, str]:
    """The float-I/O ``.tflite`` of ``precision`` for ``ctx.source`` and the route that made it; one
    ConversionError listing every route's reason when none could."""
    sub = _context(ctx)
    routes, skipped = candidate_routes(ctx.source, Format.TFLITE, {})
    routes = routes_with_precision(ctx.source, Format.TFLITE, precision, routes)
    reasons = list(skipped)
    for route in routes:
        try:
            rctx, conv = route_context(sub, route, Format.TFLITE, precision)
            return produce(rctx, conv, precision)[0], route.name
        except (Exception, SystemExit) as exc:  # a vendor tool's failure is this route's reason; try the next
            reasons.append(f"{route.name}: {failure_reason(exc, route, 'converting')}")
    raise ConversionError(f"LiteRT.js needs a .tflite and no route made one in {precision.value}: "
                          + "; ".join(reasons) + " (use the default --web-runtime onnxruntime-web)")


def signature_specs(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input and output specs (name, shape, dtype) of a ``.tflite`` by its default signature's names — the names
    LiteRT.js reports — or by tensor name when the model has no signature."""
    mod = require("ai_edge_litert.interpreter", "tflite", "inspecting .tflite files")
    it = mod.Interpreter(model_path=str(path))

    def spec(name: str, d: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "shape": [int(v) for v in d["shape"]], "dtype": d["dtype"].__name__}

    sigs = it.get_signature_list()
    if sigs:
        key = next(iter(sigs))
        runner = it.get_signature_runner(key)
        ins, outs = runner.get_input_details(), runner.get_output_details()
        return ([spec(n, ins[n]) for n in sigs[key]["inputs"]], [spec(n, outs[n]) for n in sigs[key]["outputs"]])
    return ([spec(d["name"], d) for d in it.get_input_details()],
            [spec(d["name"], d) for d in it.get_output_details()])


def _float_io(path: Path, specs: list[dict[str, Any]], notes: list[str]) -> None:
    """Give an int8 / int16-I/O model float boundaries in place (LiteRT.js cannot feed such tensors)."""
    if all(s["dtype"] in LITERTJS_DTYPES for s in specs):
        return
    from edge_sdk.converters.tflite_quantize import float_io

    path.write_bytes(float_io(path.read_bytes()))
    notes.append("the .tflite had integer inputs/outputs: QUANTIZE/DEQUANTIZE ops added so LiteRT.js gets float32")


def build_litertjs_folder(ctx: ConversionContext, precision: Precision, out: Path) -> ArtifactDraft:
    """The LiteRT.js web folder of ``precision`` at ``out`` (module docstring)."""
    from edge_sdk.converters.onnx_to_web import assemble_web_folder

    base, route = tflite_for_web(ctx, precision)
    model = ctx.scratch(f"litertjs-{precision.value}") / "model.tflite"
    model.write_bytes(Path(base.path).read_bytes())
    notes = [f"LiteRT.js ({LITERTJS_CORE.name}) WASM backend; made from the {precision.value} .tflite (route "
             f"{route}, float inputs/outputs); serve with COOP/COEP headers for multi-threaded WASM "
             "(edge-sdk web serve)"]
    ins, outs = signature_specs(model)
    _float_io(model, ins + outs, notes)
    ins, outs = signature_specs(model)
    bad = [f"{s['name']} ({s['dtype']})" for s in ins + outs if s["dtype"] not in LITERTJS_DTYPES]
    if bad:
        raise UnsupportedConversionError(
            f"LiteRT.js {LITERTJS_CORE.version} has tensors of {', '.join(LITERTJS_DTYPES)} only; the .tflite has "
            f"{', '.join(bad)}: use --web-runtime onnxruntime-web for this model")
    runtime = assemble_web_folder(out, runtime="litertjs", model_name="model.tflite",
                                  write_model=lambda p: p.write_bytes(model.read_bytes()), inputs=ins, outputs=outs,
                                  precision=precision, ctx=ctx, input_layout=base.input_layout)
    runtime["tflite_route"] = route
    return ArtifactDraft(format=Format.WEB, precision=precision, path=out,
                         tool_versions={**base.tool_versions, LITERTJS_CORE.name: runtime["version"]},
                         runtime=runtime, notes=notes + list(base.notes), input_layout=base.input_layout)
