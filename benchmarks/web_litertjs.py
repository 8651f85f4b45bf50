"""LiteRT.js vs ONNX Runtime Web on the real MobileNetV2, both in headless Chromium (issue 17: pick by evidence).

Builds MobileNetV2 (torchvision weights) with ``--to tflite,web --precision fp32,int8`` once (or reuses
``--bundle``), vendors ``@litertjs/core`` and its one dependency ``@litertjs/wasm-utils`` from the npm registry
(pinned versions, the registry's sha512 ``integrity`` checked, cached under ``$EDGE_SDK_CACHE/npm/``), and serves
one folder holding both runtimes, the ``.tflite`` files and the web artifacts through
:class:`edge_sdk.runtimes.web_server.StaticSite` (cross-origin isolated: WASM threads work). Each measurement is a
fresh browser context and page holding one runtime (LiteRT.js WASM/XNNPack CPU backend, or ONNX Runtime Web
through the artifact's own ``predict.js``); rounds interleave every (runtime, precision, threads) in a rotating
order and the table reports medians over rounds. Load time is in-page: runtime import + WASM compile + model
fetch + model compile (Chromium start excluded). A timed call = wrap the input + run + read the output + free.
Accuracy: the 240 validation photo crops (seed 0) through each runtime at 1 thread, top-1 agreement and mean
cosine against the PyTorch fp32 source; the native runtimes (ai-edge-litert, onnxruntime) on the same files are
listed for context.

    python benchmarks/web_litertjs.py [--runs 50] [--rounds 3] [--threads 2] [--bundle DIR] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import base64
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

__all__ = ["build", "main", "vendor_litertjs"]

PAGE_DIR = Path(__file__).resolve().parent / "web_litertjs"
PRECISIONS = ("fp32", "int8")
_CHUNK = 8  # crops per page.evaluate call (8 x 600 kB)


def vendor_litertjs(site: Path) -> None:
    """The pinned LiteRT.js packages (edge_sdk.converters.web_vendor: integrity-checked, cached) into ``site``."""
    from edge_sdk.converters.web_vendor import vendor_runtime

    for pkg in vendor_runtime("litertjs"):
        for rel, path in pkg.files.items():
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, site / rel)


def build(out: Path) -> Path:
    """The MobileNetV2 bundle with tflite and web artifacts (fp32, int8); the int8 .tflite keeps float I/O
    (``--float-io``): LiteRT.js 2.5.3 has tensors of float32, int32 and uint8 only, and an int8-I/O model fails in
    ``loadAndCompile`` (``getDataType`` of its input details) with "Element type INT8 is not supported."."""
    from data import photo_crops
    from torch_models import mobilenet_v2_weights_path

    from edge_sdk.cli import main as cli

    work = out.parent
    np.save(work / "calib.npy", photo_crops(n=100, seed=1))
    np.save(work / "val.npy", photo_crops(n=40, seed=0))
    code = cli(["convert", str(mobilenet_v2_weights_path()), "--model-class", "torch_models:MobileNetV2",
                "--input-shape", "1,3,224,224", "--to", "tflite,web", "--float-io", "--no-ort",
                "--precision", "fp32,int8",
                "--calib", str(work / "calib.npy"), "--val", str(work / "val.npy"), "--preset", "imagenet",
                "--out", str(out), "--overwrite"])
    if code != 0:
        raise SystemExit(f"conversion failed (exit {code})")
    return out


@dataclass
class Config:
    """One (runtime, precision, threads) cell and what was measured for it."""

    runtime: str
    precision: str
    threads: int
    load_ms: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    outputs: np.ndarray | None = None
    error: str = ""

    @property
    def model(self) -> str:
        return f"lrt-{self.precision}.tflite" if self.runtime == "litertjs" else f"ort-{self.precision}/predict.js"


def make_site(bundle: Path, site: Path) -> dict[str, Path]:
    """Copy the page, LiteRT.js, the .tflite files and the web artifacts into one served folder."""
    from edge_sdk.bundle import Bundle

    b = Bundle.load(bundle)
    shutil.copytree(PAGE_DIR, site)
    vendor_litertjs(site / "litertjs")
    paths: dict[str, Path] = {}
    for prec in PRECISIONS:
        tfl = b.path_of(b.artifact("tflite", prec))
        shutil.copyfile(tfl, site / f"lrt-{prec}.tflite")
        shutil.copytree(b.path_of(b.artifact("web", prec)), site / f"ort-{prec}")
        paths[f"tflite/{prec}"] = tfl
        paths[f"onnx/{prec}"] = site / f"ort-{prec}" / "model.onnx"
    return paths


def _tflite_io(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    return it.get_input_details()[0], it.get_output_details()[0]


def _to_model_input(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float crops (N,3,224,224) -> the .tflite input's layout and dtype (int8 I/O: quantize)."""
    shape = list(detail["shape"])
    if shape[-1] == 3 and x.shape[1] == 3:
        x = x.transpose(0, 2, 3, 1)
    dt = np.dtype(detail["dtype"])
    if dt != np.float32:
        scale, zp = detail["quantization"]
        info = np.iinfo(dt)
        x = np.clip(np.round(x / scale) + zp, info.min, info.max)
    return np.ascontiguousarray(x.astype(dt))


def _from_model_output(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    if np.dtype(detail["dtype"]) != np.float32:
        scale, zp = detail["quantization"]
        return (y.astype(np.float32) - zp) * scale
    return y.astype(np.float32)


def source_outputs(x: np.ndarray) -> np.ndarray:
    """The PyTorch fp32 source's logits on the crops (the reference)."""
    import torch
    from torch_models import MobileNetV2, mobilenet_v2_weights_path

    m = MobileNetV2()
    m.load_state_dict(torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True))
    m.eval()
    with torch.no_grad():
        return np.concatenate([m(torch.from_numpy(x[i:i + 20])).numpy() for i in range(0, len(x), 20)])


def native_rows(paths: dict[str, Path], x: np.ndarray, runs: int, warmup: int) -> dict[str, tuple[np.ndarray, float]]:
    """Native ai-edge-litert / onnxruntime at 1 thread on the same files: (outputs, p50 ms)."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    rows: dict[str, tuple[np.ndarray, float]] = {}
    for prec in PRECISIONS:
        it = Interpreter(model_path=str(paths[f"tflite/{prec}"]), num_threads=1)
        it.allocate_tensors()
        di, do = it.get_input_details()[0], it.get_output_details()[0]
        xin = _to_model_input(x, di)

        def run_lrt(v: np.ndarray, it: Any = it, di: Any = di, do: Any = do) -> np.ndarray:
            it.set_tensor(di["index"], v[None])
            it.invoke()
            return it.get_tensor(do["index"])[0]

        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(paths[f"onnx/{prec}"]), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def run_ort(v: np.ndarray, sess: Any = sess, name: str = name) -> np.ndarray:
            return sess.run(None, {name: v[None]})[0][0]

        for key, fn, inp, post in (("litert (native)", run_lrt, xin, lambda y, do=do: _from_model_output(y, do)),
                                   ("onnxruntime (native)", run_ort, x, lambda y: y)):
            outs = np.stack([post(fn(v)) for v in inp])
            for _ in range(warmup):
                fn(inp[0])
            ms = []
            for _ in range(runs):
                t0 = time.perf_counter()
                fn(inp[0])
                ms.append((time.perf_counter() - t0) * 1e3)
            rows[f"{key}/{prec}"] = (outs, statistics.median(ms))
    return rows


def _call(page: Any, cfg: Config, js: str, arg: Any) -> dict[str, Any] | None:
    res = page.evaluate(js, arg)
    if not res.get("ok"):
        cfg.error = str(res.get("error", "")).splitlines()[0][:300]
        return None
    return res


def measure(page: Any, cfg: Config, x: np.ndarray, runs: int, warmup: int, *, all_crops: bool) -> None:
    """Load cfg's runtime and model in a fresh page; run the crops (all, or the first one only); time the last."""
    info = _call(page, cfg, "(a) => window.__bench.setup(a)",
                 {"runtime": cfg.runtime, "model": cfg.model, "threads": cfg.threads})
    if info is None:
        return
    cfg.info = info
    cfg.load_ms.append(float(info["loadMs"]))
    dims, n = [1, *x.shape[1:]], (len(x) if all_crops else 1)
    outs = []
    for i in range(0, n, _CHUNK):
        part = np.ascontiguousarray(x[i:min(i + _CHUNK, n)])
        res = _call(page, cfg, "([b, n, d, t]) => window.__bench.runBatch(b, n, d, t)",
                    [base64.b64encode(part.tobytes()).decode(), len(part), dims, str(x.dtype)])
        if res is None:
            return
        dt = {"Float32Array": np.float32, "Int8Array": np.int8, "Uint8Array": np.uint8}[res["dtype"]]
        outs.append(np.frombuffer(base64.b64decode(res["b64"]), dtype=dt).reshape(len(part), -1))
    if all_crops:
        cfg.outputs = np.concatenate(outs)
    res = _call(page, cfg, "([r, w, d]) => window.__bench.timed(r, w, d)", [runs, warmup, dims])
    if res is None:
        return
    ms = np.asarray(res["ms"])
    cfg.p50.append(float(np.percentile(ms, 50)))
    cfg.p95.append(float(np.percentile(ms, 95)))


def _agreement(y: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    top1 = float((y.argmax(1) == ref.argmax(1)).mean())
    cos = float(np.mean(np.sum(y * ref, 1) / (np.linalg.norm(y, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)))
    return top1, cos


def table(cfgs: list[Config], native: dict[str, tuple[np.ndarray, float]], ref: np.ndarray,
          post: dict[str, Callable[[np.ndarray], np.ndarray]]) -> str:
    """One markdown table: browser rows (medians over rounds) then native context rows."""
    med = statistics.median
    lines = ["| runtime | precision | threads | load ms | p50 ms | p95 ms | top-1 vs source | cosine vs source |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    acc: dict[tuple[str, str], tuple[float, float]] = {}
    for c in cfgs:
        if c.outputs is not None:
            acc[(c.runtime, c.precision)] = _agreement(post[f"{c.runtime}/{c.precision}"](c.outputs), ref)
    names = {"litertjs": "LiteRT.js 2.5.3 (WASM)", "ort": "onnxruntime-web 1.31.1 (WASM)"}
    for c in sorted(cfgs, key=lambda c: (c.precision, c.threads, c.runtime)):
        if c.error or not c.p50:
            lines.append(f"| {names[c.runtime]} | {c.precision} | {c.threads} | failed: {c.error} | | | | |")
            continue
        a = acc.get((c.runtime, c.precision))
        acc_cells = f"{a[0] * 100:.2f} % | {a[1]:.6f}" if a else "(same as 1 thread) | "
        lines.append(f"| {names[c.runtime]} | {c.precision} | {c.threads} | {med(c.load_ms):.0f} | {med(c.p50):.2f} "
                     f"| {med(c.p95):.2f} | {acc_cells} |")
    for key, (outs, p50) in sorted(native.items(), key=lambda kv: kv[0].split("/")[::-1]):
        name, prec = key.split("/")
        t1, cos = _agreement(outs, ref)
        lines.append(f"| {name} | {prec} | 1 | | {p50:.2f} | | {t1 * 100:.2f} % | {cos:.6f} |")
    return "\n".join(lines)


def main() -> None:
    """Build (or reuse --bundle), vendor LiteRT.js, measure both runtimes interleaved, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="the N of the multi-threaded runs (default 2)")
    ap.add_argument("--crops", type=int, default=240, help="validation photo crops for accuracy (default 240)")
    ap.add_argument("--bundle", type=Path, help="reuse (or keep) the bundle built by an earlier run")
    ap.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = ap.parse_args()
    from data import photo_crops
    from playwright.sync_api import sync_playwright

    from edge_sdk.runtimes.onnxruntime_web import launch_browser
    from edge_sdk.runtimes.web_server import StaticSite

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    x = photo_crops(n=args.crops, seed=0)
    with tempfile.TemporaryDirectory(prefix="web_litertjs_") as tmp:
        if args.bundle and args.bundle.is_dir():
            bundle = args.bundle
        else:
            bundle = build(Path(tmp) / "bundle")
            if args.bundle:
                shutil.copytree(bundle, args.bundle)
        paths = make_site(bundle, Path(tmp) / "site")
        log("reference: PyTorch source + native runtimes")
        ref = source_outputs(x)
        native = native_rows(paths, x, args.runs, args.warmup)
        tin, post = {}, {}
        for prec in PRECISIONS:
            di, do = _tflite_io(paths[f"tflite/{prec}"])
            tin[prec] = _to_model_input(x, di)
            post[f"litertjs/{prec}"] = lambda y, do=do: _from_model_output(y, do)
            post[f"ort/{prec}"] = lambda y: y.astype(np.float32)
        cfgs = [Config(rt, prec, t) for prec in PRECISIONS for t in sorted({1, args.threads})
                for rt in ("litertjs", "ort")]
        site = StaticSite(Path(tmp) / "site").start()
        origin = site.url

        def offline(route: Any) -> None:  # only the served folder: what is measured works offline
            if route.request.url.startswith(origin + "/"):
                route.continue_()
            else:
                route.abort()

        try:
            with sync_playwright() as pw:
                browser = launch_browser(pw)
                for rnd in range(args.rounds):
                    k = rnd % len(cfgs)
                    for cfg in cfgs[k:] + cfgs[:k]:
                        if cfg.error:
                            continue
                        ctx = browser.new_context()
                        page = ctx.new_page()
                        page.set_default_timeout(300_000)
                        page.route("**/*", offline)
                        page.goto(f"{origin}/index.html")
                        page.wait_for_function("document.body.dataset.ready === '1'")
                        inp = tin[cfg.precision] if cfg.runtime == "litertjs" else x
                        measure(page, cfg, inp, args.runs, args.warmup, all_crops=rnd == 0 and cfg.threads == 1)
                        log(f"round {rnd + 1} {cfg.runtime} {cfg.precision} t{cfg.threads}: "
                            + (f"failed: {cfg.error}" if cfg.error else
                               f"load {cfg.load_ms[-1]:.0f} ms p50 {cfg.p50[-1]:.2f} ms "
                               f"(threads {cfg.info.get('threads')}, wasm threads {cfg.info.get('wasmThreads')}, "
                               f"isolated {cfg.info.get('isolated')})"))
                        ctx.close()
                browser.close()
        finally:
            site.stop()
    out = table(cfgs, native, ref, post)
    print(out)
    if args.out:
        args.out.write_text(out + "\n")


if __name__ == "__main__":
    main()
