"""ONNX -> a web artifact: the ONNX model plus everything a page needs to run it with ONNX Runtime Web (WASM);
or, with ``web_runtime = "litertjs"`` (``--web-runtime litertjs``), the ``.tflite`` of the same source run by
LiteRT.js (converters/litertjs_web.py; same folder layout, ``model.tflite`` and ``litertjs/`` instead).

The artifact is a folder a static host can serve as it is (``edge-sdk web serve BUNDLE`` for local testing)::

    web/<precision>/
        model.onnx        the ONNX artifact of the same precision (int8 = the QDQ model ORT runs natively)
        model.json        name, task, labels, preprocessing, input/output specs, runtime version and file hashes
        predict.js        dependency-free ES module: preprocessing (resize, colour order, layout, mean/std) of an
                          <img>, <video> frame, ImageData or typed array, then the session, then top-k with labels
        index.html        demo page: file picker, webcam, results, latency
        ort/              ONNX Runtime Web, vendored from the npm registry at build time (converters/web_vendor.py)
                          (litertjs: litertjs/ with @litertjs/core and @litertjs/wasm-utils, and an import map
                          in index.html)

Each precision's folder carries its own copy of the runtime (~15 MB) so it deploys alone; ``runtime.model_bytes``
in the manifest is the model's share of the artifact's size.

Before anything is written, the model's ops are checked against what the pinned web runtime accepts: an op of a
domain ONNX Runtime does not implement, or an op whose definition is newer than the runtime's highest ai.onnx
opset, is refused in one line naming the op. A model stamped with a newer opset whose ops are all older is
re-stamped with the runtime's opset (same semantics). Validation then runs the folder in headless Chromium
through the ``onnxruntime-web`` runtime (edge_sdk/runtimes/onnxruntime_web.py), like every other target.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from edge_sdk._deps import has_module, require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, OptionSpec, check_precision, register
from edge_sdk.converters.model_card import card_of
from edge_sdk.converters.onnx_quantize import OnnxExporter
from edge_sdk.converters.web_vendor import ORT_WEB_PACKAGE, WEB_RUNTIMES, vendor_runtime
from edge_sdk.errors import ConversionError, MissingDependencyError, UnsupportedConversionError
from edge_sdk.formats import Format, Framework, Precision
from edge_sdk.runtimes.onnxruntime_web import browser_problem

__all__ = ["MAX_AI_ONNX_OPSET", "RUNTIME_LAYOUT", "WEB_DOMAINS", "OnnxToWeb", "assemble_web_folder", "check_web_ops",
           "write_web_folder"]

#: the highest ai.onnx opset the pinned onnxruntime-web accepts (1.31.1 refuses 27: "support ... is till opset 26")
MAX_AI_ONNX_OPSET = 26
#: op domains ONNX Runtime's WASM build implements (the same CPU kernels as native ONNX Runtime)
WEB_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc")
ASSETS = ("predict.js", "index.html")
#: web runtime -> (folder of its vendored files, entry module, WASM folder, import map) inside that folder
RUNTIME_LAYOUT: dict[str, tuple[str, str, str, dict[str, str]]] = {
    "onnxruntime-web": ("ort", "ort.wasm.min.mjs", "", {}),
    "litertjs": ("litertjs", "core/index.js", "wasm/", {"@litertjs/wasm-utils": "wasm-utils/index.js"}),
}
_IMPORT_MAP_SLOT = "<!--import-map: the build puts the runtime's import map here (LiteRT.js needs one)-->"


def _nodes(graph: Any) -> Any:
    """Every node of a graph, subgraphs (If / Loop / Scan bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


def check_web_ops(model: Any) -> bool:
    """Refuse (UnsupportedConversionError, one line naming the ops) what the web runtime cannot load; return True
    when the model must be re-stamped with :data:`MAX_AI_ONNX_OPSET` (newer opset, only older ops)."""
    onnx = require("onnx", "onnx", "checking ONNX ops for the web runtime")
    local = {f.name for f in model.functions}
    opsets = {o.domain or "": o.version for o in model.opset_import}
    foreign, newer = set(), set()
    for node in _nodes(model.graph):
        dom = node.domain or ""
        if dom not in WEB_DOMAINS:
            if node.op_type not in local:
                foreign.add(f"{dom}:{node.op_type}")
            continue
        if dom in ("", "ai.onnx") and opsets.get(dom, 0) > MAX_AI_ONNX_OPSET:
            try:
                since = onnx.defs.get_schema(node.op_type, opsets[dom], dom).since_version
            except Exception:  # onnx.defs.SchemaError: an op this onnx does not know either
                since = opsets[dom]
            if since > MAX_AI_ONNX_OPSET:
                newer.add(f"{node.op_type} (opset {since})")
    if foreign:
        raise UnsupportedConversionError(
            f"{ORT_WEB_PACKAGE} cannot run op(s) {', '.join(sorted(foreign))}: their domain is not implemented by "
            "the web runtime (custom ops need a custom WASM build); replace them or export without them")
    if newer:
        raise UnsupportedConversionError(
            f"{ORT_WEB_PACKAGE} lacks op(s) {', '.join(sorted(newer))}: it implements ai.onnx up to opset "
            f"{MAX_AI_ONNX_OPSET}; export with --opset {MAX_AI_ONNX_OPSET} or lower")
    return any(opsets.get(d, 0) > MAX_AI_ONNX_OPSET for d in ("", "ai.onnx"))


def _tensor_specs(values: Any, inits: set[str]) -> list[dict[str, Any]]:
    onnx = require("onnx", "onnx")
    out = []
    for v in values:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else "float32"
        shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": dtype})
    return out


def assemble_web_folder(out: Path, *, runtime: str, model_name: str, write_model: Callable[[Path], None],
                        inputs: list[dict[str, Any]], outputs: list[dict[str, Any]], precision: Precision,
                        ctx: ConversionContext, input_layout: str | None) -> dict[str, Any]:
    """Write the artifact folder of web runtime ``runtime`` (module docstring): the model (``write_model``), the
    page assets, the vendored runtime and ``model.json``; return the manifest's ``runtime`` entry."""
    packages = vendor_runtime(runtime)
    sub, entry, wasm_dir, imports = RUNTIME_LAYOUT[runtime]
    rt = packages[0]
    if out.exists():
        shutil.rmtree(out)
    (out / sub).mkdir(parents=True)
    write_model(out / model_name)
    assets = resources.files("edge_sdk.converters").joinpath("web_assets")
    for name in ASSETS:
        (out / name).write_bytes(assets.joinpath(name).read_bytes())
    import_map = {k: f"./{sub}/{v}" for k, v in imports.items()}
    if import_map:
        page = (out / "index.html").read_text()
        tag = f'<script type="importmap">{json.dumps({"imports": import_map})}</script>'
        (out / "index.html").write_text(page.replace(_IMPORT_MAP_SLOT, tag, 1))
    vendored = []
    for pkg in packages:
        for rel, path in sorted(pkg.files.items()):
            dest = out / sub / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            vendored.append({"path": f"{sub}/{rel}", "sha256": pkg.sha256[rel], "size_bytes": dest.stat().st_size,
                             **({"package": pkg.package} if len(packages) > 1 else {})})
    card = card_of(ctx.options)
    pre = card.preprocessing.to_dict() if card is not None and card.preprocessing is not None else {}
    src = ctx.source
    layout = input_layout or getattr(src, "layout", "") or None
    if pre and layout:
        pre["layout"] = layout  # the artifact's own input layout wins over the source's
    for spec in inputs:
        spec["layout"] = layout
    run_cfg = {"package": rt.package, "version": rt.version, "entry": f"{sub}/{entry}", "wasm_dir": f"{sub}/{wasm_dir}"}
    if import_map:
        run_cfg["import_map"] = import_map
    config = {
        "name": card.name if card is not None else (src.path.stem if src.path else "model"),
        "version": card.version if card is not None else "1",
        "task": card.task if card is not None else "other",
        "labels": list(card.labels) if card is not None and card.labels else None,
        "preprocessing": pre,
        "precision": precision.value,
        "model": model_name,
        "inputs": inputs,
        "outputs": outputs,
        "runtime": run_cfg,
    }
    (out / "model.json").write_text(json.dumps(config, indent=1) + "\n")
    info: dict[str, Any] = {
        "runtime": runtime, "package": rt.package, "version": rt.version, "integrity": rt.integrity,
        "tarball": rt.tarball_url, "entry": "predict.js", "page": "index.html", "model": model_name,
        "model_bytes": (out / model_name).stat().st_size, "backend": "wasm", "vendored": vendored,
        "headers": {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}}
    if len(packages) > 1:
        info["dependencies"] = [{"package": p.package, "version": p.version, "integrity": p.integrity,
                                 "tarball": p.tarball_url} for p in packages[1:]]
    return info


def write_web_folder(out: Path, model: Any, *, precision: Precision, ctx: ConversionContext,
                     input_layout: str | None) -> dict[str, Any]:
    """Write the ONNX Runtime Web artifact folder of ``model``; return the manifest's ``runtime`` entry."""
    onnx = require("onnx", "onnx", "writing the web artifact")
    inits = {i.name for i in model.graph.initializer}
    return assemble_web_folder(out, runtime="onnxruntime-web", model_name="model.onnx",
                               write_model=lambda p: onnx.save(model, str(p)),
                               inputs=_tensor_specs(model.graph.input, inits),
                               outputs=_tensor_specs(model.graph.output, set()), precision=precision, ctx=ctx,
                               input_layout=input_layout)


@register
class OnnxToWeb:
    """ONNX artifact (any source) -> a web folder for ONNX Runtime Web (WASM) with predict.js and a demo page."""

    sources = (Framework.PYTORCH, Framework.KERAS, Framework.ONNX, Framework.TFLITE)
    target = Format.WEB
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    budget_ladder = OnnxExporter.budget_ladder  # the web model is the ONNX artifact: same rungs
    extra_options = (*OnnxExporter.extra_options,
                     OptionSpec("web_runtime", str, "onnxruntime-web", tuple(WEB_RUNTIMES),
                                "the browser runtime: onnxruntime-web (the ONNX artifact) or litertjs (the .tflite)"))

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Produce the web folder of ``precision`` from ``ctx.onnx(precision)`` (litertjs: from the .tflite)."""
        check_precision(self, precision)
        web_runtime = str(ctx.options.extra.get("web_runtime", "onnxruntime-web"))
        if not has_module("playwright"):  # no way to validate in a browser here: refused, like a missing tool
            raise MissingDependencyError("playwright", "web", "validating web artifacts in Chromium")
        problem = browser_problem()
        if problem is not None:
            raise ConversionError(f"cannot validate web artifacts: {problem}")
        if web_runtime == "litertjs":
            from edge_sdk.converters.litertjs_web import build_litertjs_folder

            return [build_litertjs_folder(ctx, precision, ctx.path_for(Format.WEB, precision, ""))]
        onnx = require("onnx", "onnx", "building web artifacts")
        base = ctx.onnx(precision)
        model = onnx.load(str(base.path))
        notes = [f"{ORT_WEB_PACKAGE} WASM backend; made from the {precision.value} ONNX artifact; serve with "
                 "COOP/COEP headers for multi-threaded WASM (edge-sdk web serve)"]
        if check_web_ops(model):
            for o in model.opset_import:
                if (o.domain or "") in ("", "ai.onnx"):
                    o.version = MAX_AI_ONNX_OPSET
            notes.append(f"re-stamped with ai.onnx opset {MAX_AI_ONNX_OPSET} (no op of the model changed after it)")
        out = ctx.path_for(Format.WEB, precision, "")
        runtime = write_web_folder(out, model, precision=precision, ctx=ctx, input_layout=base.input_layout)
        return [ArtifactDraft(format=Format.WEB, precision=precision, path=out,
                              tool_versions={**base.tool_versions, ORT_WEB_PACKAGE: runtime["version"]},
                              runtime=runtime, notes=notes, input_layout=base.input_layout)]
