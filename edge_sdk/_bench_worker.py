"""Measure one artifact with one runtime: the code a fresh benchmark process runs, and how it is started.

``python -m edge_sdk._bench_worker '<json job>'`` loads the artifact, runs it
``warmup + runs`` times on seeded random inputs and prints one JSON object on stdout (native
libraries' own prints are diverted to stderr so they cannot corrupt it). The parent
(:mod:`edge_sdk.benchmark`) starts one such process per artifact and thread count, so
the memory high-water mark belongs to that artifact alone; :func:`run_job` starts such a process
and turns every failure (known error, crash, timeout) into ``{"ok": False, "error": ...}``.

The job keys: ``runtime`` (registry name), ``path``, ``threads`` (int or null), ``runs``, ``warmup``,
``seed``, ``options`` (extra keyword arguments for ``Runtime.load``), ``shapes`` (fallback sizes for
dynamic dimensions, may be empty).
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import has_module
from edge_sdk.bundle import TensorSpec
from edge_sdk.errors import EdgeSDKError
from edge_sdk.runtimes import all_runtimes, bench_modules, get_runtime
from edge_sdk.runtimes.base import cpuinfo

__all__ = ["RUNTIME_MODULES", "host_info", "main", "make_inputs", "measure", "rss_bytes", "run_job"]

#: modules each runtime imports, loaded before the memory baseline is taken (from each runtime's ``bench_modules``)
RUNTIME_MODULES: dict[str, tuple[str, ...]] = bench_modules()


def rss_bytes() -> tuple[int | None, int | None]:
    """(current RSS, RSS high-water mark) of this process in bytes; None where the OS does not say."""
    status = Path("/proc/self/status")
    if status.is_file():
        fields = {}
        for line in status.read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields.get("VmRSS"), fields.get("VmHWM")
    try:
        import resource
    except ImportError:  # Windows
        return None, None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return None, int(peak if sys.platform == "darwin" else peak * 1024)


def make_inputs(specs: list[TensorSpec], seed: int, shapes: list[list[int | None]] | None = None) -> list[np.ndarray]:
    """Seeded inputs for ``specs``: standard normal float32 for float or quantized inputs, zeros otherwise.

    Dynamic dimensions take the size from ``shapes`` (the manifest's) when known, else 1.
    Quantized (int8/uint8 with a scale) inputs get float32: the session quantizes them.
    """
    rng = np.random.default_rng(seed)
    out = []
    for k, spec in enumerate(specs):
        hint = shapes[k] if shapes and k < len(shapes) else []
        shape = []
        for i, dim in enumerate(spec.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif i < len(hint) and isinstance(hint[i], int) and hint[i] > 0:
                shape.append(int(hint[i]))
            else:
                shape.append(1)
        dtype = np.dtype(spec.dtype) if spec.dtype else np.dtype("float32")
        if dtype.kind == "f" or spec.scale is not None:
            out.append(rng.standard_normal(shape).astype(np.float32))
        else:
            out.append(np.zeros(shape, dtype=dtype))
    return out


def _import_runtime_modules(name: str) -> None:
    for module in bench_modules().get(name, ()):
        if has_module(module.split(".")[0]):
            try:
                importlib.import_module(module)
            except ImportError:
                continue  # Runtime.load reports a broken install with the right extra
            return


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Load and time one artifact as ``job`` says; return the figures (see the module docstring).

    Latencies are per call, in milliseconds, measured with ``time.perf_counter_ns``.
    Raises the runtime's EdgeSDKError (InferenceError, MissingDependencyError, ...) on failure.
    """
    rt = get_runtime(job["runtime"])
    _import_runtime_modules(rt.name)
    rss_base, hwm_base = rss_bytes()
    t0 = time.perf_counter_ns()
    session = rt.load(Path(job["path"]), threads=job.get("threads"), **(job.get("options") or {}))
    load_ms = (time.perf_counter_ns() - t0) / 1e6
    try:
        inputs = make_inputs(session.inputs, int(job.get("seed", 0)), job.get("shapes"))
        _, hwm_loaded = rss_bytes()
        timed = getattr(session, "timed_runs", None)
        if callable(timed):  # a runtime that times itself (the browser: no Python <-> page transfer in the figure)
            latencies = timed(inputs, int(job.get("runs", 100)), int(job.get("warmup", 10)))
        else:
            for _ in range(int(job.get("warmup", 10))):
                session.run(inputs)
            latencies = []
            run = session.run
            clock = time.perf_counter_ns
            for _ in range(int(job.get("runs", 100))):
                t = clock()
                run(inputs)
                latencies.append((clock() - t) / 1e6)
        rss_now, hwm = rss_bytes()
        extra = {}
        for attr in ("inference_precision", "delegate"):
            value = getattr(session, attr, None)
            if isinstance(value, str):
                extra[attr] = value
    finally:
        session.close()
    return {
        "ok": True,
        "runtime": rt.name,
        "runtime_version": rt.version(),
        "load_ms": load_ms,
        "latencies_ms": latencies,
        "input_shapes": [list(x.shape) for x in inputs],
        "baseline_rss_bytes": hwm_base if hwm_base is not None else rss_base,
        "loaded_peak_rss_bytes": hwm_loaded,
        "peak_rss_bytes": hwm,
        "final_rss_bytes": rss_now,
        "session": extra,
    }


def host_info() -> dict[str, Any]:
    """CPU model, logical cores, OS, Python and the version of every runtime installed here."""
    # the first of these lines in the file names the CPU (x86 "model name"; ARM boards "Hardware" / "Model")
    cpu = next(iter(cpuinfo("model name", "Model", "Hardware").values()), platform.processor() or platform.machine())
    info: dict[str, Any] = {"cpu": cpu, "machine": platform.machine(), "logical_cores": os.cpu_count(),
                            "os": platform.platform(), "python": platform.python_version()}
    if hasattr(os, "sched_getaffinity"):
        info["usable_cores"] = len(os.sched_getaffinity(0))
    info["runtimes"] = {rt.name: rt.version() for rt in all_runtimes() if rt.is_available()}
    return info


def run_job(job: dict[str, Any], *, isolate: bool = True, timeout: float | None = 600) -> dict[str, Any]:
    """Run one job in a fresh process (``isolate``) or here; return the result dict, ``ok`` False on failure.

    A known error, a crash (signal), a non-zero exit or a timeout all give ``{"ok": False, "error": ...}``.
    """
    if not isolate:
        try:
            return measure(job)
        except EdgeSDKError as exc:
            return {"ok": False, "error": str(exc).splitlines()[0]}
    cmd = [sys.executable, "-m", "edge_sdk._bench_worker", json.dumps(job)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        stdout = proc.stdout
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:g} s: lower the runs or raise the timeout"}
    except subprocess.CalledProcessError as exc:
        result = _last_json(exc.stdout)
        if result is not None and not result.get("ok", True):
            return result
        if exc.returncode < 0:
            try:
                why = f"killed by {signal.Signals(-exc.returncode).name}"
            except ValueError:
                why = f"killed by signal {-exc.returncode}"
        else:
            why = f"exited with code {exc.returncode}"
        tail = " | ".join((exc.stderr or "").strip().splitlines()[-3:])
        return {"ok": False, "error": f"benchmark process {why}" + (f": {tail}" if tail else "")}
    result = _last_json(stdout)
    if result is None:
        return {"ok": False, "error": "benchmark process printed no result"}
    return result


def _last_json(text: str | None) -> dict[str, Any] | None:
    for line in reversed((text or "").strip().splitlines()):
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        return value if isinstance(value, dict) else None
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the job given as a JSON argument; print the result JSON; exit 0 on success, 3 on a known error."""
    argv = sys.argv[1:] if argv is None else argv
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the runtime prints goes to stderr, stdout carries only our JSON
    sys.stdout = sys.stderr
    try:
        job = json.loads(argv[0])
        result = measure(job)
        code = 0
    except EdgeSDKError as exc:
        result = {"ok": False, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                  "error_type": type(exc).__name__}
        code = 3
    out.write(json.dumps(result) + "\n")
    out.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
