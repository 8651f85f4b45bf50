"""Which int8 QDQ recipe keeps fp32's top-1 under native ONNX Runtime on this CPU, and at what latency.

    python benchmarks/ort_int8_recipes.py [--rounds 5] [--runs 30] [--warmup 5] [--only NAME,NAME]
                                          [--sessions ALL,ALL+u8u8,BASIC] [--web] [--mixed 2,4] [--fresh]
                                          [--cache .cache/ort_int8_recipes]

The real ImageNet MobileNetV2 (``examples/torch_models.load_mobilenet_v2``) is exported to fp32 ONNX once; 200
calibration (seed 1) and 240 validation (seed 0) photo crops come from ``examples/data.photo_crops``. All three
are cached under ``--cache``, and so is every quantized model (``--fresh`` rebuilds them). Each recipe is made by
the SDK's own :func:`~edge_sdk.converters.onnx_quantize.quantize_static_qdq` with the option set it names,
then run under each ONNX Runtime session setting of ``--sessions`` (:data:`SESSIONS`): ``ALL`` (the device
runtime's setting: Q/DQ pairs fused into QLinearConv / QLinearAdd integer kernels), ``ALL+u8u8`` (the same plus
``session.x64quantprecision=1``: on x86 without VNNI, U8S8 products go through ORT's U8U8 kernel instead of the
16-bit-saturating ``vpmaddubsw`` one; a no-op elsewhere) and ``BASIC`` (no Q/DQ fusion: float emulation of the
same graph); more settings (optimizers disabled, other config keys) are in :data:`SESSIONS`.

Per (recipe, session): top-1 agreement with fp32 on the 240 crops and cosine of the logits (the SDK's
``compare_outputs``), size ratio, and latency ratio against fp32 (level ALL): 1 thread, batch 1, every
measurement in a fresh process, rounds interleaved (order reversed every other round), p50 over all rounds.
A recipe's ``float_types`` keeps every node of those op types float (``onnx_float_nodes``), the SDK's way of
saying ``op_types_to_quantize`` / ``nncf.IgnoredScope(types=...)``.
``--web`` also runs each int8 model in ONNX Runtime Web (WASM, headless Chromium, the SDK's web runtime) and
prints, per recipe, the largest logit difference and the argmax agreement between the browser and each native
setting (MobileNetV2 nncf-u8s8 on AVX2 without VNNI: ``ALL+u8u8`` equals the browser bit for bit).
``--mixed K,..`` adds ``ort-u8s8`` with the K most sensitive layers (converters/sensitivity.py) kept in float.
Prints one markdown table; ``--json FILE`` also writes the raw figures.

Measured (ORT 1.32, AMD EPYC AVX2 without VNNI, loaded machine, fp32 9.3 ms): nncf-u8s8 ALL 88.3% at 0.72x fp32,
ALL+u8u8 91.25% at 1.00x (bit-identical to onnxruntime-web 1.31.1: both build the same 72-node graph, 52
QLinearConv + 10 QLinearAdd, but WASM's integer kernels do not saturate), BASIC 90.0% at 2.45x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEFAULT_SESSIONS", "RECIPES", "SESSIONS", "Recipe", "SessionSetting", "build_inputs", "cpu_flags",
           "logits", "main", "nodes_of_types", "quantize", "top1_and_cosine"]

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class SessionSetting:
    """One native ONNX Runtime session setting: graph optimization level, config entries, disabled optimizers."""

    name: str
    level: str
    config: dict[str, str] = field(default_factory=dict)
    disabled: tuple[str, ...] = ()


SESSIONS = {s.name: s for s in (
    SessionSetting("ALL", "ALL"),
    SessionSetting("ALL+u8u8", "ALL", {"session.x64quantprecision": "1"}),
    SessionSetting("BASIC", "BASIC"),
    SessionSetting("EXTENDED", "EXTENDED"),
    SessionSetting("ALL-selector", "ALL", disabled=("QDQSelectorActionTransformer",)),
    SessionSetting("ALL-propagation", "ALL", disabled=("QDQPropagationTransformer",)),
    SessionSetting("ALL-nhwc", "ALL", disabled=("NhwcTransformer",)),
    SessionSetting("ALL+no-quant-qdq", "ALL", {"session.disable_quant_qdq": "1"}),
    SessionSetting("ALL+int8allowed", "ALL", {"session.qdqisint8allowed": "1"}),
)}
DEFAULT_SESSIONS = "ALL,ALL+u8u8,BASIC"


@dataclass(frozen=True)
class Recipe:
    """One int8 recipe: a name, the ``ConvertOptions.extra`` it sets and the activation type."""

    name: str
    extra: dict[str, Any] = field(default_factory=dict)
    activations: str = "uint8"
    what: str = ""
    float_types: tuple[str, ...] = ()


RECIPES = (
    Recipe("nncf-u8s8", {"onnx_quantizer": "nncf"}, what="NNCF default (U8S8, 7-bit first layer)"),
    Recipe("nncf-u8s8-rr", {"onnx_quantizer": "nncf", "onnx_reduce_range": True},
           what="NNCF U8S8, 7-bit weights everywhere (overflow_fix ENABLE)"),
    Recipe("ort-u8s8", {"onnx_quantizer": "ort"}, what="ORT U8S8"),
    Recipe("ort-u8s8-rr", {"onnx_quantizer": "ort", "onnx_reduce_range": True}, what="ORT U8S8 reduce_range"),
    Recipe("ort-u8u8", {"onnx_quantizer": "ort", "onnx_weight_type": "uint8"}, what="ORT U8U8 (uint8 w, zp 128)"),
    Recipe("ort-s8s8", {"onnx_quantizer": "ort"}, activations="int8", what="ORT S8S8"),
    Recipe("ort-u8s8-gptq", {"onnx_quantizer": "ort", "onnx_weight_rounding": "gptq"}, what="ORT U8S8 + GPTQ"),
    Recipe("ort-u8s8-rr-gptq", {"onnx_quantizer": "ort", "onnx_reduce_range": True, "onnx_weight_rounding": "gptq"},
           what="ORT U8S8 reduce_range + GPTQ (7-bit grid)"),
    Recipe("nncf-u8s8-rr-gptq", {"onnx_quantizer": "nncf", "onnx_reduce_range": True,
                                 "onnx_weight_rounding": "gptq"}, what="NNCF 7-bit + GPTQ (7-bit grid)"),
    Recipe("nncf-u8s8-noadd", {"onnx_quantizer": "nncf"}, float_types=("Add",),
           what="NNCF U8S8, residual Adds float (IgnoredScope types=[Add])"),
    Recipe("ort-u8s8-noadd", {"onnx_quantizer": "ort"}, float_types=("Add",),
           what="ORT U8S8, residual Adds float (op_types_to_quantize=[Conv, Gemm, MatMul])"),
)


def cpu_flags() -> str:
    """CPU model and its int8-relevant SIMD flags (avx2, avx512*, vnni)."""
    from edge_sdk.runtimes.base import cpuinfo

    info = cpuinfo("model name", "flags")
    model = info.get("model name") or platform.processor() or platform.machine()
    flags = set(info.get("flags", "").split())
    keep = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"))
    return f"{model} ({', '.join(keep) or 'no AVX2'})"


def build_inputs(cache: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """(fp32 ONNX path, calibration crops (200), validation crops (240)), built once into ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    fp32, crops = cache / "mobilenet_v2.fp32.onnx", cache / "crops.npz"
    if not crops.is_file():
        sys.path.insert(0, str(ROOT / "examples"))
        from data import photo_crops

        np.savez(crops, calib=photo_crops(n=200, seed=1), val=photo_crops(n=240, seed=0))
    if not fp32.is_file():
        sys.path.insert(0, str(ROOT / "examples"))
        import torch
        from torch_models import load_mobilenet_v2

        from edge_sdk.converters.torch_to_onnx import export_torch

        torch.set_num_threads(1)
        export_torch(load_mobilenet_v2().eval(), (torch.zeros(1, 3, 224, 224),), fp32, input_names=["input"],
                     output_names=["logits"], opset=18)
    data = np.load(crops)
    return fp32, data["calib"], data["val"]


def quantize(recipe: Recipe, fp32: Path, calib: np.ndarray, cache: Path, fresh: bool = False) -> tuple[Path, dict]:
    """The int8 model of ``recipe`` (cached) and the manifest fields the SDK recorded for it."""
    from edge_sdk.calibration import SampleSet
    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.onnx_quantize import quantize_static_qdq

    out, info_path = cache / f"{recipe.name}.int8.onnx", cache / f"{recipe.name}.json"
    if out.is_file() and info_path.is_file() and not fresh:
        return out, json.loads(info_path.read_text())
    extra = dict(recipe.extra)
    if recipe.float_types:
        extra["onnx_float_nodes"] = [*extra.get("onnx_float_nodes", ()), *nodes_of_types(fp32, recipe.float_types)]
    opts = ConvertOptions(onnx_activation_type=recipe.activations, extra=extra)
    t0 = time.perf_counter()
    info = quantize_static_qdq(fp32, out, SampleSet([calib]), opts, ["input"])
    info["build_s"] = f"{time.perf_counter() - t0:.0f}"
    info_path.write_text(json.dumps(info, indent=1))
    return out, info


def nodes_of_types(fp32: Path, types: tuple[str, ...]) -> list[str]:
    """Names of the nodes of ``types`` in the graph the SDK quantizes (``fp32`` after its pre-processing)."""
    import onnx

    from edge_sdk.converters.onnx_quantize import _pre_process

    pre = _pre_process(fp32, fp32.with_name("types_probe.int8.onnx"))
    try:
        return [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in types]
    finally:
        pre.unlink(missing_ok=True)


def _session(path: Path, setting: str, threads: int = 1) -> Any:
    import onnxruntime as ort

    s = SESSIONS[setting]
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{s.level}")
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    for key, value in s.config.items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(s.disabled) or None)


def logits(path: Path, setting: str, x: np.ndarray) -> np.ndarray:
    """Logits of every row of ``x`` (batch 1 per call) under the session setting ``setting`` (:data:`SESSIONS`)."""
    sess = _session(path, setting)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def top1_and_cosine(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Top-1 agreement and cosine, as the SDK's validation computes them."""
    from edge_sdk.converters.validate import compare_outputs

    v = compare_outputs([ref], [got], classifier=True)
    return float(v.top1_agreement or 0.0), float(v.cosine or 0.0)


def web_logits(path: Path, x: np.ndarray, work: Path) -> tuple[np.ndarray, str]:
    """Logits of every row of ``x`` from ``path`` run by ONNX Runtime Web in headless Chromium (1 WASM thread),
    through the SDK's own web folder writer and web runtime; and the runtime's name and version."""
    from types import SimpleNamespace

    import onnx

    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.onnx_to_web import write_web_folder
    from edge_sdk.formats import Precision
    from edge_sdk.runtimes.onnxruntime_web import RUNTIME

    folder = work / f"web-{path.stem}"
    ctx = SimpleNamespace(options=ConvertOptions(), source=SimpleNamespace(path=path, layout="NCHW"))
    write_web_folder(folder, onnx.load(str(path)), precision=Precision.INT8, ctx=ctx, input_layout="NCHW")
    sess = RUNTIME.load(folder, threads=1)
    try:
        out = np.concatenate([sess.run([x[i:i + 1]])[0] for i in range(len(x))])
        return out, f"{sess.package} {sess.version}"
    finally:
        sess.close()


def _time_one(job: dict[str, Any]) -> dict[str, Any]:
    """Worker body: load ``job['path']`` with setting ``job['level']`` (1 thread), time ``runs`` calls after
    ``warmup``."""
    sess = _session(Path(job["path"]), job["level"])
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(job["warmup"]):
        sess.run(None, feed)
    lat = []
    for _ in range(job["runs"]):
        t = time.perf_counter_ns()
        sess.run(None, feed)
        lat.append((time.perf_counter_ns() - t) / 1e6)
    return {"latencies_ms": lat}


def _timed(path: Path, level: str, runs: int, warmup: int) -> list[float]:
    job = json.dumps({"path": str(path), "level": level, "runs": runs, "warmup": warmup})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, __file__, "--time-one", job], capture_output=True, text=True, check=True,
                          env=env, timeout=600)
    return list(json.loads(proc.stdout.strip().splitlines()[-1])["latencies_ms"])


def _mixed_recipes(ks: list[int], fp32: Path, calib: np.ndarray, cache: Path) -> list[Recipe]:
    """``ort-u8s8`` with the ``k`` most sensitive layers kept float, for each ``k`` (ranking cached)."""
    if not ks:
        return []
    rank_file = cache / "sensitivity.json"
    if not rank_file.is_file():
        from edge_sdk.calibration import SampleSet
        from edge_sdk.converters.base import ConvertOptions
        from edge_sdk.converters.sensitivity import float_nodes_for, rank_onnx_layers

        ranked = rank_onnx_layers(fp32, SampleSet([calib]), ["input"], cache / "sens",
                                  ConvertOptions(extra={"onnx_quantizer": "ort"}))
        rank_file.write_text(json.dumps({str(k): float_nodes_for(ranked, k) for k in range(1, 17)}))
    nodes = json.loads(rank_file.read_text())
    return [Recipe(f"ort-u8s8-float{k}", {"onnx_quantizer": "ort", "onnx_float_nodes": nodes[str(k)]},
                   what=f"ORT U8S8, {k} most sensitive layers float") for k in ks]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=ROOT / ".cache" / "ort_int8_recipes")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    p.add_argument("--sessions", default=DEFAULT_SESSIONS,
                   help=f"comma-separated session settings, from: {', '.join(SESSIONS)}")
    p.add_argument("--web", action="store_true", help="also run each int8 model in ONNX Runtime Web (Chromium)")
    p.add_argument("--mixed", default="", help="comma-separated K: also ort-u8s8 with K layers float")
    p.add_argument("--fresh", action="store_true", help="re-quantize even when a cached model exists")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    p.add_argument("--time-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.time_one:
        print(json.dumps(_time_one(json.loads(args.time_one))))
        return 0
    levels = [n.strip() for n in args.sessions.split(",") if n.strip()]
    unknown = [n for n in levels if n not in SESSIONS]
    if unknown:
        p.error(f"unknown session setting(s) {', '.join(unknown)}: choose from {', '.join(SESSIONS)}")
    fp32, calib, val = build_inputs(args.cache)
    only = {n.strip() for n in args.only.split(",") if n.strip()}
    recipes = [r for r in RECIPES if not only or r.name in only]
    recipes += _mixed_recipes([int(k) for k in args.mixed.split(",") if k.strip()], fp32, calib, args.cache)
    ref = logits(fp32, "ALL", val)
    rows: list[dict[str, Any]] = []
    web_lines: list[str] = []
    for r in recipes:
        path, info = quantize(r, fp32, calib, args.cache, args.fresh)
        print(f"built {r.name} ({info.get('build_s', 'cached')} s)", file=sys.stderr)
        web = None
        if args.web:
            web, web_rt = web_logits(path, val, args.cache)
            top1, cos = top1_and_cosine(ref, web)
            web_lines.append(f"- {r.name}: {web_rt} (Chromium, 1 WASM thread) top-1 {100 * top1:.2f}%, cosine "
                             f"{cos:.4f}; native vs browser:")
        for level in levels:
            out = logits(path, level, val)
            top1, cos = top1_and_cosine(ref, out)
            if web is not None:
                web_lines.append(f"  - {level}: max |logit diff| {float(np.abs(out - web).max()):.4f}, argmax "
                                 f"agreement {100 * float(np.mean(out.argmax(1) == web.argmax(1))):.1f}%")
            rows.append({"recipe": r.name, "what": r.what, "level": level, "path": str(path), "top1": top1,
                         "cosine": cos, "size": path.stat().st_size / fp32.stat().st_size, "lat": [],
                         "info": {k: v for k, v in info.items() if k.startswith("onnx_")}})
            print(f"  {level}: top-1 {100 * top1:.2f}%  cosine {cos:.4f}", file=sys.stderr)
    jobs = [("fp32", str(fp32), "ALL")] + [(row["recipe"], row["path"], row["level"]) for row in rows]
    lat: dict[int, list[float]] = {i: [] for i in range(len(jobs))}
    for rnd in range(args.rounds):
        order = list(range(len(jobs)))[:: 1 if rnd % 2 == 0 else -1]
        for i in order:
            lat[i] += _timed(Path(jobs[i][1]), jobs[i][2], args.runs, args.warmup)
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    base = float(np.median(lat[0])) if lat[0] else float("nan")
    for i, row in enumerate(rows, start=1):
        row["lat"] = lat[i]
        row["p50_ms"] = float(np.median(lat[i])) if lat[i] else float("nan")
    import onnxruntime as ort

    print(f"MobileNetV2 (ImageNet), 240 photo crops, top-1 agreement with fp32 ORT; ONNX Runtime {ort.__version__} "
          f"on {cpu_flags()}; 1 thread, {args.rounds} interleaved rounds x {args.runs} runs, fresh process each; "
          f"fp32 p50 {base:.3f} ms (graph opt ALL)\n")
    print("| recipe | session | top-1 agreement | cosine | size ratio | p50 ms | latency ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['recipe']} ({row['what']}) | {row['level']} | {100 * row['top1']:.1f}% | {row['cosine']:.4f} "
              f"| {row['size']:.2f}x | {row['p50_ms']:.3f} | {row['p50_ms'] / base:.2f}x |")
    if web_lines:
        print("\nBrowser (ONNX Runtime Web) vs native, same int8 file:\n" + "\n".join(web_lines))
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_flags(), "fp32_p50_ms": base, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
