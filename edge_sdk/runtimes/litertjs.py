"""LiteRT.js (``@litertjs/core``, WASM / XNNPack) inside headless Chromium, for web artifacts built with
``--web-runtime litertjs``.

The same browser harness as :mod:`edge_sdk.runtimes.onnxruntime_web` (loopback static server with the
cross-origin isolation headers, system Chromium through Playwright, every other origin aborted, the artifact's own
``predict.js``): only the registry name differs, so ``edge-sdk benchmark`` reports ``litertjs`` for those
artifacts (their manifest entry says ``"runtime": "litertjs"``). Measured on MobileNetV2 (benchmarks/web_litertjs.py):
1.7x faster fp32 inference than onnxruntime-web at 1 thread, 2x faster load, same outputs.
"""

from __future__ import annotations

from edge_sdk.formats import Format
from edge_sdk.runtimes.onnxruntime_web import OnnxRuntimeWeb

__all__ = ["RUNTIME", "LiteRtJs"]


class LiteRtJs(OnnxRuntimeWeb):
    """LiteRT.js (WASM, relaxed SIMD; threads when cross-origin isolated) in headless Chromium; ``web`` folders
    holding a ``.tflite``."""

    name = "litertjs"
    formats = (Format.WEB,)
    extra = "web"
    rank = 91  # after onnxruntime-web: the default web artifact is the ONNX one
    bench_modules = ("playwright.sync_api",)
    plot_markers = (("web", "P"),)


RUNTIME = LiteRtJs()
