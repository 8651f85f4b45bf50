"""LiteRT.js as the web target's second browser runtime (issue 17): `--to web --web-runtime litertjs` builds a
folder with the source's .tflite (float I/O) and the vendored LiteRT.js, validated in headless Chromium by LiteRT.js
itself, benchmarked under the runtime name `litertjs`, and served offline by `edge-sdk web serve`."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.bundle import Bundle, sha256_file
from edge_sdk.cli import main
from edge_sdk.runtimes.onnxruntime_web import browser_problem, launch_browser

pytestmark = pytest.mark.skipif(browser_problem() is not None, reason=str(browser_problem()))

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import make_tiny

    d = tmp_path_factory.mktemp("litertjs")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    np.save(d / "calib.npy", np.random.default_rng(0).standard_normal((48, 3, 32, 32)).astype(np.float32))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["convert", str(d / "tiny.pt"), "--model-class", "tiny_models:TinyCNN", "--input-shape",
                     "1,3,32,32", "--to", "web", "--web-runtime", "litertjs", "--precision", "fp32,int8",
                     "--calib", str(d / "calib.npy"), "--resize", "32x32", "--mean", ",".join(map(str, MEAN)),
                     "--std", ",".join(map(str, STD)), "--out", str(d / "b"), "--json"])
    assert code == 0, buf.getvalue()[:3000]
    return d / "b"


def _native(tflite: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(tflite))
    it.allocate_tensors()
    di, do = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(di["index"], x)
    it.invoke()
    return it.get_tensor(do["index"])


def test_litertjs_artifacts_validate_in_chromium_with_float_io_and_pinned_vendored_files(bundle: Path) -> None:
    from edge_sdk.converters.litertjs_web import signature_specs

    b = Bundle.load(bundle)
    b.verify()
    for prec in ("fp32", "int8"):
        a = b.artifact("web", prec)
        v = a.validation
        assert v.passed is True and v.samples > 0, (prec, v)
        if prec == "fp32":
            assert v.cosine >= 0.9999 and v.top1_agreement == 1.0, v
        folder = b.path_of(a)
        cfg = json.loads((folder / "model.json").read_text())
        assert cfg["model"] == "model.tflite" and cfg["precision"] == prec
        assert cfg["runtime"]["package"] == "@litertjs/core" and cfg["runtime"]["version"] == "2.5.3"
        assert cfg["runtime"]["import_map"] == {"@litertjs/wasm-utils": "./litertjs/wasm-utils/index.js"}
        assert '<script type="importmap">' in (folder / "index.html").read_text()
        assert a.runtime["runtime"] == "litertjs" and a.runtime["integrity"].startswith("sha512-")
        assert [d["package"] for d in a.runtime["dependencies"]] == ["@litertjs/wasm-utils"]
        paths = {f["path"] for f in a.runtime["vendored"]}
        assert {"litertjs/core/index.js", "litertjs/wasm-utils/index.js",
                "litertjs/wasm/litert_wasm_internal.wasm", "litertjs/wasm/litert_wasm_threaded_internal.wasm",
                "litertjs/wasm/litert_wasm_compat_internal.wasm"} <= paths
        for f in a.runtime["vendored"]:  # the manifest's sha256 is the shipped file's
            assert sha256_file(folder / f["path"]) == f["sha256"], f["path"]
        ins, outs = signature_specs(folder / "model.tflite")  # LiteRT.js has no int8 tensors: float I/O
        assert [s["dtype"] for s in ins + outs] == ["float32", "float32"], (prec, ins, outs)
    assert b.artifact("web", "int8").runtime["model_bytes"] < b.artifact("web", "fp32").runtime["model_bytes"] / 2


def test_litertjs_session_runs_litertjs_and_matches_native_litert(bundle: Path) -> None:
    from edge_sdk.benchmark import benchmark_bundle
    from edge_sdk.runtimes import get_runtime

    b = Bundle.load(bundle)
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    for prec in ("fp32", "int8"):
        folder = b.path_of(b.artifact("web", prec))
        sess = get_runtime("litertjs").load(folder, threads=1)
        try:
            assert sess.backend == "litertjs" and sess.threads == 1
            got = sess.run([x])[0]
        finally:
            sess.close()
        want = _native(folder / "model.tflite", x)
        tol = 1e-5 if prec == "fp32" else 1e-3 * float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=tol)
    report = benchmark_bundle(b, runs=5, warmup=1, isolate=False, artifacts=["web/fp32"])
    r = report.results[0]
    assert r.status == "ok" and r.runtime == "litertjs" and r.p50_ms > 0, r


def test_served_litertjs_page_works_offline_and_classifies_like_native(bundle: Path) -> None:
    from playwright.sync_api import sync_playwright

    from edge_sdk.preprocessing import Preprocessing

    rgba = np.random.default_rng(3).integers(0, 256, (32, 32, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    want_x = Preprocessing(size=(32, 32), mean=MEAN, std=STD).apply(np.ascontiguousarray(rgba[..., 2::-1]))
    want_y = _native(bundle / "web" / "fp32" / "model.tflite", want_x)
    proc = subprocess.Popen([sys.executable, "-m", "edge_sdk.cli", "web", "serve", str(bundle), "--port", "0",
                             "--precision", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = ""
        for line in proc.stdout:
            if line.startswith("serving "):
                break
        assert line.startswith("serving "), (line, proc.stderr.read() if proc.stderr else "")
        url = line.split(" at ")[1].split(" ")[0]
        with sync_playwright() as pw:
            browser = launch_browser(pw)
            page = browser.new_page()
            blocked: list[str] = []

            def route(r):  # the network is off for the page: only the served folder answers
                if r.request.url.startswith(url + "/"):
                    return r.continue_()
                blocked.append(r.request.url)
                return r.abort("internetdisconnected")

            page.route("**/*", route)
            page.goto(url + "/")
            page.wait_for_function("document.body.dataset.ready", timeout=60_000)
            assert page.evaluate("document.body.dataset.ready") == "1", page.inner_text("#meta")
            meta = page.inner_text("#meta")
            got = page.evaluate("""async (px) => {
                const m = await import('./predict.js');
                const p = await m.load();
                const img = new ImageData(new Uint8ClampedArray(px), 32, 32);
                const r = await p.predict(img, { topK: 3 });
                return { x: Array.from(p.preprocess(img)), y: Array.from(r.outputs[0]), top: r.top,
                         backend: p.backend.name, threads: p.threads };
            }""", rgba.ravel().tolist())
            browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert "litertjs 2.5.3" in meta and got["backend"] == "litertjs", (meta, got["backend"])
    assert not blocked, blocked
    np.testing.assert_allclose(np.asarray(got["x"], np.float32), want_x.ravel(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["y"], np.float32), want_y.ravel(), rtol=1e-4, atol=1e-4)
    assert got["top"][0]["index"] == int(want_y.argmax())


def test_an_int8_io_tflite_gets_float_io_and_loads_in_litertjs(bundle: Path, tmp_path: Path) -> None:
    """litert-torch's PT2E int8 (tflite_quantizer=native) has int8 inputs/outputs, which LiteRT.js 2.5.3 refuses
    ("Element type INT8 is not supported."): the build adds QUANTIZE/DEQUANTIZE and the artifact validates."""
    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.litertjs_web import signature_specs
    from edge_sdk.converters.pipeline import convert
    from edge_sdk.runtimes.onnxruntime_web import explain_load_error

    src = bundle.parent
    b = convert(src / "tiny.pt", out=tmp_path / "b", to="web", precision="int8", calib=src / "calib.npy",
                model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], quiet=True,
                options=ConvertOptions(extra={"web_runtime": "litertjs", "tflite_quantizer": "native"}))
    a = b.artifact("web", "int8")
    assert a.validation.passed is True, a.validation
    assert any("QUANTIZE/DEQUANTIZE ops added" in n for n in a.notes), a.notes
    ins, outs = signature_specs(b.path_of(a) / "model.tflite")
    assert [s["dtype"] for s in ins + outs] == ["float32", "float32"]
    msg = explain_load_error("Error: Element type INT8 is not supported.\n  at getDataType", "2.5.3",
                             "@litertjs/core")
    assert "\n" not in msg and "--float-io" in msg and "@litertjs/core 2.5.3" in msg


def test_a_garbage_or_oversized_runtime_tarball_is_refused_and_nothing_is_cached(tmp_path: Path, monkeypatch) -> None:
    """The offline tarball is a file anyone could have put there: garbage fails the pinned sha512, an oversized one
    is refused before it is read; neither leaves files in the runtime cache."""
    from edge_sdk.converters import web_vendor
    from edge_sdk.errors import ConversionError

    monkeypatch.setenv("EDGE_SDK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGE_SDK_NPM_REGISTRY", "http://127.0.0.1:9")  # never reached: the local file is used
    pkg = web_vendor.LITERTJS_CORE
    local = web_vendor.tarball_path(pkg.version, pkg)
    local.parent.mkdir(parents=True)
    local.write_bytes(b"\x1f\x8b not a tarball " * 100)
    with pytest.raises(ConversionError, match="does not match the pinned npm integrity") as err:
        web_vendor.vendor_package(pkg)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(web_vendor, "_MAX_TARBALL", 1024)
    with pytest.raises(ConversionError, match="over the 0 MB limit"):
        web_vendor.vendor_package(pkg)
    assert not (local.parent / pkg.cache_name).exists()
