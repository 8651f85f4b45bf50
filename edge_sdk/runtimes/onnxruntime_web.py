"""ONNX Runtime Web (WASM) inside headless Chromium, for ``web`` artifacts: the browser as a runtime.

A web artifact is a folder (``model.onnx``, ``model.json``, ``predict.js``, ``index.html`` and the vendored runtime
in ``ort/``). :meth:`OnnxRuntimeWeb.load` serves that folder on a loopback port with the cross-origin isolation
headers (:mod:`edge_sdk.runtimes.web_server`), opens it in the system Chromium through Playwright for Python
(``executable_path``: no browser download, ``playwright install`` is never needed), with every request to
another origin aborted — so what is measured is what works offline — and creates the session through the
artifact's own ``predict.js``. :meth:`WebSession.run` sends the float32 input to the page and reads the outputs
back, so validation and benchmarks exercise the code a user's page runs.

Chromium is found as ``$EDGE_SDK_CHROMIUM``, else ``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH.
Session-creation failures in the page (an op or opset the runtime lacks) become one line naming the op.

The JavaScript runtime is the one the artifact's ``model.json`` names (``predict.js`` picks ONNX Runtime Web or
LiteRT.js and puts both behind one ``backend.run``), so :class:`WebSession` runs either kind of folder; the
``litertjs`` registry entry (:mod:`edge_sdk.runtimes.litertjs`) is this runtime under the name LiteRT.js artifacts
carry, so benchmarks and reports name what actually ran.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import has_module, require
from edge_sdk.bundle import TensorSpec
from edge_sdk.errors import InferenceError, InputError, MissingDependencyError, first_line
from edge_sdk.formats import Format
from edge_sdk.runtimes.base import check_inputs, check_threads

__all__ = ["CHROMIUM_ENV", "LAUNCH_ARGS", "RUNTIME", "OnnxRuntimeWeb", "WebSession", "browser_problem",
           "explain_load_error", "find_chromium", "launch_browser"]

CHROMIUM_ENV = "EDGE_SDK_CHROMIUM"
LAUNCH_ARGS = ("--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage")
_TIMEOUT_MS = 180_000
_DTYPES = ("float32", "int32", "int64", "uint8", "int8", "bool")

# Runs in the page: load the artifact through its predict.js and keep the predictor on window.
_LOAD_JS = """async (threads) => {
  try {
    const m = await import('./predict.js');
    window.__edge = await m.load({ threads: threads ?? undefined });
    const b = window.__edge.backend;
    return { ok: true, threads: window.__edge.threads, isolated: crossOriginIsolated, backend: b.name,
             inputs: b.inputNames, outputs: b.outputNames };
  } catch (e) { return { ok: false, error: String(e && e.message || e) }; }
}"""

# Runs in the page: decode base64 inputs, run the backend, return outputs as base64 (``repeat`` > 1: timed loop;
# a timed call = wrap the inputs in the runtime's tensors + run + read the outputs, as predict.js's run does).
_RUN_JS = """async ([feeds, repeat, warmup]) => {
  const b = window.__edge.backend;
  const b2u = (s) => {
    const x = atob(s), u = new Uint8Array(x.length);
    for (let i = 0; i < x.length; i++) u[i] = x.charCodeAt(i);
    return u;
  };
  const u2b = (u) => {
    let s = '';
    for (let i = 0; i < u.length; i += 32768) s += String.fromCharCode.apply(null, u.subarray(i, i + 32768));
    return btoa(s);
  };
  const T = { float32: Float32Array, int32: Int32Array, int64: BigInt64Array, uint8: Uint8Array, int8: Int8Array,
              bool: Uint8Array };
  const inputs = {};
  for (const f of feeds) {
    const bytes = b2u(f.b64);
    const n = bytes.byteLength / T[f.dtype].BYTES_PER_ELEMENT;
    inputs[f.name] = { type: f.dtype, data: new T[f.dtype](bytes.buffer, 0, n), dims: f.dims };
  }
  try {
    for (let i = 0; i < warmup; i++) await b.run(inputs);
    const ms = [];
    let res = null;
    for (let i = 0; i < repeat; i++) {
      const t0 = performance.now();
      res = await b.run(inputs);
      ms.push(performance.now() - t0);
    }
    const outs = b.outputNames.map((k) => {
      const t = res[k], d = t.data;
      const bytes = new Uint8Array(d.buffer, d.byteOffset, d.byteLength);
      return { name: k, dtype: t.type, dims: t.dims, b64: u2b(bytes) };
    });
    return { ok: true, ms, outputs: outs };
  } catch (e) { return { ok: false, error: String(e && e.message || e) }; }
}"""

_NP = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int32": np.int32, "int64": np.int64,
       "uint8": np.uint8, "int8": np.int8, "bool": np.bool_}


def find_chromium() -> str | None:
    """The Chromium executable: ``$EDGE_SDK_CHROMIUM`` or the first of chromium / chromium-browser / google-chrome."""
    env = os.environ.get(CHROMIUM_ENV)
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_problem() -> str | None:
    """Why the browser runtime cannot run here (one line naming what to install), or None."""
    if not has_module("playwright"):
        return "playwright is not installed (needed to drive Chromium): pip install \"edge-sdk[web]\""
    if find_chromium() is None:
        return (f"Chromium was not found (set {CHROMIUM_ENV} to its path): apt-get install chromium "
                "(Debian/Ubuntu), or install Chrome")
    return None


def explain_load_error(message: str, version: str = "", package: str = "onnxruntime-web") -> str:
    """The browser's session-creation error in one line, naming the op or opset the web runtime lacks."""
    rt = f"{package} {version}".strip()
    if package != "onnxruntime-web":
        if "is not supported" in message and "Element type" in message:
            return (f"{rt} cannot load the model: {first_line(message, 200)} (it has float32/int32/uint8 tensors "
                    "only): rebuild the .tflite with float inputs/outputs (--float-io)")
        return f"{rt} cannot load the model: {first_line(message, 300)}"
    m = re.search(r"([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op", message)
    if m:
        dom = m.group(1) or "ai.onnx"
        return (f"{rt} does not have op {m.group(2)} (domain {dom}): the model needs an op the web runtime lacks; "
                "replace it or export without it")
    m = re.search(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'", message)
    if m:
        return (f"{rt} has no kernel for op {m.group(1)} (version {m.group(2)}, node {m.group(3)!r}) with these "
                "input types: the web runtime lacks it; export with other types or without the op")
    m = re.search(r"Opset (\d+) is under development.*?domain ([\w.]+) is till opset (\d+)", message, re.S)
    if m:
        return (f"{rt} supports {m.group(2)} up to opset {m.group(3)}, the model uses opset {m.group(1)}: "
                f"export with opset <= {m.group(3)}")
    return f"{rt} cannot load the model: {first_line(message, 300)}"


def launch_browser(playwright: Any, *, headless: bool = True) -> Any:
    """The system Chromium, launched by Playwright (InferenceError in one line when it cannot start)."""
    exe = find_chromium()
    if exe is None:
        raise InferenceError(browser_problem() or "Chromium was not found")
    try:
        return playwright.chromium.launch(executable_path=exe, headless=headless, args=list(LAUNCH_ARGS))
    except Exception as exc:  # Playwright's Error: a broken or incompatible browser install
        raise InferenceError(f"Chromium at {exe} did not start ({first_line(exc, 200)}): check the install "
                             f"(`{exe} --headless --version`)") from None


def _encode(x: np.ndarray, name: str, want: str) -> dict[str, Any]:
    if want not in _DTYPES:
        raise InputError(f"input {name!r} has type {want}, which this runtime does not pass to the browser")
    arr = np.ascontiguousarray(x.astype(_NP[want], copy=False))
    return {"name": name, "dtype": want, "dims": list(arr.shape), "b64": base64.b64encode(arr.tobytes()).decode()}


def _decode(out: dict[str, Any]) -> np.ndarray:
    dt = _NP.get(out["dtype"], np.float32)
    return np.frombuffer(base64.b64decode(out["b64"]), dtype=dt).reshape([int(d) for d in out["dims"]]).copy()


class WebSession:
    """A web artifact loaded in a headless Chromium page (see the module docstring)."""

    def __init__(self, path: Path, threads: int | None) -> None:
        from edge_sdk.runtimes.web_server import StaticSite

        self.path = path
        try:
            self.config = json.loads((path / "model.json").read_text())
        except (OSError, ValueError) as exc:
            raise InferenceError(f"{path} is not a web artifact ({first_line(exc)}): model.json is missing or "
                                 "unreadable; rebuild with `edge-sdk convert --to web`") from None
        self.version = str(self.config.get("runtime", {}).get("version", ""))
        self.package = str(self.config.get("runtime", {}).get("package", "onnxruntime-web"))
        self.inputs: list[TensorSpec] = [TensorSpec(t["name"], list(t["shape"]), t.get("dtype", "float32"))
                                         for t in self.config.get("inputs", [])]
        self.outputs: list[TensorSpec] = [TensorSpec(t["name"], list(t["shape"]), t.get("dtype", "float32"))
                                          for t in self.config.get("outputs", [])]
        sync_api = require("playwright.sync_api", "web", "running web artifacts in Chromium")
        self._site = StaticSite(path).start()
        self._pw = self._browser = None
        try:
            self._pw = sync_api.sync_playwright().start()
            self._browser = launch_browser(self._pw)
            self._page = self._browser.new_page()
            self._page.set_default_timeout(_TIMEOUT_MS)
            origin = self._site.url
            self._page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(origin + "/")
                             else route.abort())  # offline: only the artifact's own files
            self._page.goto(f"{origin}/index.html?autoload=0")
            info = self._page.evaluate(_LOAD_JS, threads)
        except InferenceError:
            self.close()
            raise
        except Exception as exc:  # Playwright errors (browser crash, timeout): one line
            self.close()
            raise InferenceError(f"Chromium failed while loading {path.name} ({first_line(exc, 200)})") from None
        if not info.get("ok"):
            self.close()
            raise InferenceError(explain_load_error(str(info.get("error", "")), self.version, self.package))
        self.threads = int(info["threads"])
        self.isolated = bool(info["isolated"])
        self.backend = str(info.get("backend", ""))
        names = list(info["inputs"])
        if [s.name for s in self.inputs] != names:  # model.json and the model disagree: trust the model's order
            by_name = {s.name: s for s in self.inputs}
            self.inputs = [by_name.get(n, TensorSpec(n, [], "float32")) for n in names]
        self.last_ms: float | None = None

    def _call(self, inputs: list[np.ndarray], repeat: int, warmup: int) -> dict[str, Any]:
        if self._browser is None:
            raise InferenceError(f"session for {self.path.name} is closed: load the model again")
        check_inputs(inputs, self.inputs)
        feeds = [_encode(x, s.name, s.dtype or "float32") for x, s in zip(inputs, self.inputs, strict=True)]
        try:
            res = self._page.evaluate(_RUN_JS, [feeds, repeat, warmup])
        except Exception as exc:  # a crashed page / browser
            raise InferenceError(f"Chromium failed running {self.path.name} ({first_line(exc, 200)})") from None
        if not res.get("ok"):
            raise InferenceError(f"{self.package} failed to run {self.path.name} ({first_line(res.get('error'))}): "
                                 "check the inputs match the model's inputs")
        return res

    def run(self, inputs: list[np.ndarray], *, raw: bool = False) -> list[np.ndarray]:
        """Run one batch in the page; outputs in model order (``last_ms``: the in-page inference time)."""
        res = self._call(inputs, 1, 0)
        self.last_ms = float(res["ms"][0])
        return [_decode(o) for o in res["outputs"]]

    def timed_runs(self, inputs: list[np.ndarray], runs: int, warmup: int = 0) -> list[float]:
        """Per-call latencies in ms measured inside the page (``performance.now``), without the transfer to and
        from Python: what a page calling ``session.run`` sees."""
        return [float(v) for v in self._call(inputs, max(1, int(runs)), max(0, int(warmup)))["ms"]]

    def close(self) -> None:
        """Close the page, the browser, Playwright and the static server."""
        for closer in (getattr(self._browser, "close", None), getattr(self._pw, "stop", None)):
            if closer is not None:
                try:
                    closer()
                except Exception:  # already gone (crashed browser): nothing left to release
                    pass
        self._browser = self._pw = None
        site, self._site = getattr(self, "_site", None), None
        if site is not None:
            site.stop()


class OnnxRuntimeWeb:
    """ONNX Runtime Web (WASM SIMD, threads when cross-origin isolated) in headless Chromium; ``web`` folders."""

    name = "onnxruntime-web"
    formats = (Format.WEB,)
    extra = "web"
    rank = 90  # after every native runtime: a device agent uses it only when nothing native runs the bundle
    bench_modules = ("playwright.sync_api",)
    plot_markers = (("web", "P"),)

    def is_available(self) -> bool:
        """True when playwright is importable and a Chromium executable is found (nothing is started)."""
        return browser_problem() is None

    def version(self) -> str | None:
        """The Chromium version (the runtime's own version is pinned per artifact, in its model.json)."""
        exe = find_chromium()
        return _chromium_version(exe) if exe and has_module("playwright") else None

    def load(self, path: Path, *, threads: int | None = None) -> WebSession:
        """Open the web artifact folder ``path`` in Chromium and create its session."""
        if not has_module("playwright"):
            raise MissingDependencyError("playwright", "web", "running web artifacts in Chromium")
        problem = browser_problem()
        if problem is not None:
            raise InferenceError(problem)
        path = Path(path)
        if not path.is_dir() or not (path / "model.json").is_file():
            raise InferenceError(f"{path} is not a web artifact folder (model.json missing): rebuild with "
                                 "`edge-sdk convert --to web`")
        check_threads(threads)
        return WebSession(path, threads)


@functools.lru_cache(maxsize=4)
def _chromium_version(exe: str) -> str | None:
    try:
        out = subprocess.run([exe, "--headless", "--no-sandbox", "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"(\d+\.\d+\.\d+\.\d+)", out)
    return f"chromium {m.group(1)}" if m else None


RUNTIME = OnnxRuntimeWeb()
