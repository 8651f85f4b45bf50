"""Routes: the ordered ways to reach one target from one kind of source, tried until one works.

A route is either *direct* (the converter registered for (source framework, target)) or goes *via ONNX*:
the source is exported to fp32 ONNX once (``ctx.onnx``), loaded as an ONNX source, and the converter
registered for (onnx, target) (or the route's own converter) takes it from there. For example TorchScript ->
tflite: litert-torch needs ``torch.export`` (a ScriptModule has none), so the route is TorchScript -> ONNX ->
onnx2tf, and when onnx2tf stops, TorchScript -> ONNX -> PyTorch ops (onnx2torch) -> litert-torch.

The route that produced an artifact is recorded in the manifest (``route``, per artifact) and in the table;
when every route fails, the artifact's reason lists each attempt with its one-line cause. ``--route NAME``
(or ``--route TARGET=NAME``) forces one.

Every exception a vendor tool raises inside a route (any type) becomes that attempt's one-line reason —
tool, stage, what to try — so one failing artifact never takes the others down.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edge_sdk.converters.base import ConversionContext, Converter, check_precision, get_converter
from edge_sdk.errors import EdgeSDKError, UnsupportedConversionError, first_line
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["ROUTES", "Route", "all_route_converters", "converter_of", "failure_reason", "parse_forced_routes",
           "route_context", "route_converter", "routes_for", "routes_with_precision"]


def _not_torchscript(src: Any) -> str | None:
    if getattr(src, "kind", "") == "torchscript":
        return "litert-torch needs torch.export, which a TorchScript module does not support"
    return None


def _always(src: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Route:
    """One way to a target. ``tool`` names what does the work (for messages); ``via`` the intermediate format."""

    name: str
    tool: str
    via: Format | None = None
    applies: Callable[[Any], str | None] = _always  # None when it applies to this source, else why not
    options: tuple[tuple[str, Any], ...] = ()  # ConvertOptions.extra entries this route sets for its converter
    converter: str = ""  # "module:Class" of an unregistered converter this route uses instead of the registry's


#: ONNX -> PyTorch -> TFLite without onnx2tf's NCHW -> NHWC rewriting (converters/onnx_torch_route.py)
_ONNX2TORCH = "edge_sdk.converters.onnx_torch_route:OnnxTorchToTFLite"

#: Ordered routes per (source framework, target). Pairs not listed have one direct route named after the tool
#: of their registered converter (see :func:`routes_for`).
ROUTES: dict[tuple[Framework, Format], tuple[Route, ...]] = {
    (Framework.PYTORCH, Format.TFLITE): (
        Route("litert-torch", "litert-torch", applies=_not_torchscript),
        Route("onnx2tf", "torch.onnx + onnx2tf", via=Format.ONNX),
        Route("onnx2torch", "torch.onnx + onnx2torch + litert-torch", via=Format.ONNX, converter=_ONNX2TORCH),
    ),
    (Framework.KERAS, Format.TFLITE): (
        Route("tflite-converter", "tf.lite.TFLiteConverter"),
        Route("onnx2tf", "tf2onnx + onnx2tf", via=Format.ONNX),
    ),
    (Framework.ONNX, Format.TFLITE): (
        Route("onnx2tf", "onnx2tf"),
        Route("onnx2torch", "onnx2torch + litert-torch", converter=_ONNX2TORCH),
    ),
    (Framework.PYTORCH, Format.COREML): (
        Route("coremltools", "coremltools (torch.export)"),
        Route("coremltools-trace", "coremltools (torch.jit.trace)", options=(("coreml_capture", "trace"),)),
    ),
    (Framework.KERAS, Format.COREML): (Route("coremltools", "coremltools"),),
    (Framework.PYTORCH, Format.ONNX): (Route("torch.onnx", "torch.onnx.export"),),
    (Framework.KERAS, Format.ONNX): (Route("tf2onnx", "tf2onnx"),),
    (Framework.ONNX, Format.ONNX): (Route("as-is", "onnx"),),
    (Framework.PYTORCH, Format.OPENVINO): (
        Route("onnx+openvino", "torch.onnx + openvino.convert_model"),
        Route("openvino-pytorch", "openvino.convert_model (PyTorch frontend)",
              converter="edge_sdk.converters.torch_to_openvino:TorchToOpenVINO"),
    ),
    (Framework.KERAS, Format.OPENVINO): (
        Route("onnx+openvino", "tf2onnx + openvino.convert_model"),
        Route("openvino-tf", "openvino.convert_model (TensorFlow frontend)",
              converter="edge_sdk.converters.keras_to_openvino:KerasToOpenVINO"),
    ),
    (Framework.ONNX, Format.OPENVINO): (Route("openvino", "openvino.convert_model"),),
    **{(fw, Format.ORT): (Route("ort-tools", "onnxruntime.tools.convert_onnx_models_to_ort"),)
       for fw in (Framework.PYTORCH, Framework.KERAS, Framework.ONNX)},
    (Framework.TFLITE, Format.TFLITE): (Route("as-is", "the existing .tflite"),),
    (Framework.TFLITE, Format.ONNX): (Route("tf2onnx", "tf2onnx --tflite"),),
    (Framework.TFLITE, Format.OPENVINO): (Route("openvino", "openvino.convert_model (TFLite frontend)"),),
    (Framework.TFLITE, Format.ORT): (Route("ort-tools", "tf2onnx + onnxruntime.tools"),),
    (Framework.OPENVINO, Format.OPENVINO): (Route("as-is", "the existing OpenVINO IR"),),
}


def routes_for(framework: Framework, target: Format) -> tuple[Route, ...]:
    """The ordered routes for (framework, target); a registered converter without an entry is one direct route."""
    if (framework, target) in ROUTES:
        return ROUTES[(framework, target)]
    get_converter(framework, target)  # raises UnsupportedConversionError naming what exists
    return (Route("direct", f"{framework.value} -> {target.value}"),)


def converter_of(src: Any, route: Route, target: Format) -> Converter:
    """The converter that does the work of ``route`` (the route's own, else the registry's for its source)."""
    return route_converter(route) or get_converter(src.framework if route.via is None else Framework.ONNX, target)


def routes_with_precision(src: Any, fmt: Format, p: Precision, routes: list[Route]) -> list[Route]:
    """The routes whose converter can produce ``p``; UnsupportedConversionError (the first route's) when none."""
    ok, first = [], None
    for r in routes:
        try:
            check_precision(converter_of(src, r, fmt), p)
            ok.append(r)
        except UnsupportedConversionError as exc:
            first = first or exc
    if not ok:
        raise first or UnsupportedConversionError(f"{fmt.value} cannot be produced in {p.value}")
    return ok


def all_route_converters() -> list[Converter]:
    """The converters routes name explicitly (not in the registry), for option checking."""
    return [c for c in (route_converter(r) for rs in ROUTES.values() for r in rs) if c is not None]


def parse_forced_routes(items: Sequence[str] | Mapping[str, str] | str | None) -> dict[str, str]:
    """``--route NAME`` / ``--route TARGET=NAME`` (repeatable) -> {target or '*': name}."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return {str(k): str(v) for k, v in items.items()}
    if isinstance(items, str):
        items = [items]
    out: dict[str, str] = {}
    for item in items:
        target, sep, name = item.partition("=")
        key = target.strip().lower() if sep else "*"
        if key != "*":
            Format.parse(key)  # ValueError naming the choices
        out[key] = (name if sep else target).strip()
    return out


def candidate_routes(src: Any, target: Format, forced: Mapping[str, str]) -> tuple[list[Route], list[str]]:
    """Routes to try in order, and the routes skipped with their reason (``name: why``)."""
    routes = routes_for(src.framework, target)
    want = forced.get(target.value, forced.get("*"))
    if want is not None:
        chosen = [r for r in routes if r.name == want]
        if not chosen:
            if target.value in forced:  # asked for this target by name: a wrong name is the user's mistake
                raise UnsupportedConversionError(
                    f"--route {target.value}={want} is not a route from {src.framework.value} to {target.value}: "
                    f"choose from {', '.join(r.name for r in routes)}")
        else:
            routes = tuple(chosen)
    usable, skipped = [], []
    for r in routes:
        why = r.applies(src)
        if why is None:
            usable.append(r)
        else:
            skipped.append(f"{r.name}: {why}")
    if not usable:
        raise UnsupportedConversionError(f"no route from this {src.framework.value} source to {target.value}: "
                                         + "; ".join(skipped))
    return usable, skipped


def route_context(ctx: ConversionContext, route: Route, target: Format,
                  precision: Precision) -> tuple[ConversionContext, Converter]:
    """The context and converter that run ``route``: the given ones for a direct route; for a route via ONNX, a
    context whose source is the fp32 ONNX export of ``ctx.source`` (made once per conversion and shared)."""
    if route.via is None:
        conv = route_converter(route) or get_converter(ctx.source.framework, target)
        check_precision(conv, precision)
        return (_with_options(ctx, route) if route.options else ctx), conv
    sub = ctx.derived.get(route.via)
    if sub is None:
        from edge_sdk.converters.sources import OnnxSource

        onnx_draft = ctx.onnx(Precision.FP32)
        shapes = dict(zip(ctx.source.input_names, ctx.source.input_shapes, strict=True))
        names = _onnx_names(onnx_draft.path)
        src = OnnxSource(onnx_draft.path, dict(zip(names, shapes.values(), strict=False)),
                         input_dtypes=dict(zip(names, ctx.source.input_dtypes, strict=False)))
        src.layout = ctx.source.layout  # the export keeps the source's layout; never guess it again
        sub = ConversionContext(src, ctx.workdir / f"via_{route.via.value}", calibration=ctx.calibration,
                                options=ctx.options)
        ctx.derived[route.via] = sub
    conv = route_converter(route) or get_converter(Framework.ONNX, target)
    check_precision(conv, precision)
    return sub, conv


def route_converter(route: Route) -> Converter | None:
    """The converter a route names explicitly (imported on first use), or None for the registry's."""
    if not route.converter:
        return None
    import importlib

    module, _, cls = route.converter.partition(":")
    return getattr(importlib.import_module(module), cls)()


def _with_options(ctx: ConversionContext, route: Route) -> ConversionContext:
    """A context for ``route`` with its option overrides, sharing the source and the ONNX exports (made once)."""
    key = f"options:{route.name}"
    sub = ctx.derived.get(key)
    if sub is None:
        opts = replace(ctx.options, extra={**ctx.options.extra, **dict(route.options)})
        sub = ConversionContext(ctx.source, ctx.workdir / f"route_{route.name}", calibration=ctx.calibration,
                                options=opts)
        sub._onnx, sub._onnx_errors = ctx._onnx, ctx._onnx_errors
        sub.owns_source = False
        ctx.derived[key] = sub
    return sub


def _onnx_names(path: Any) -> list[str]:
    from edge_sdk.converters.onnx_common import onnx_input_names

    return onnx_input_names(path)


def failure_reason(exc: BaseException, route: Route, stage: str) -> str:
    """One line for an attempt that raised: the SDK's own message as it is, anything else as tool + stage + fix."""
    if isinstance(exc, EdgeSDKError):
        return " ".join(str(exc).split())
    if isinstance(exc, MemoryError):
        return f"{route.tool} ran out of memory while {stage}: try a smaller --calib-limit or another route"
    return (f"{route.tool} failed while {stage} ({type(exc).__name__}: {first_line(exc)}): a bug or limit of "
            "that tool on this model; try another --route or target, or report it with the model")
