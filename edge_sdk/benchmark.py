"""Benchmark every artifact of a bundle on this host: load time, latency, throughput, memory, size, accuracy.

Each artifact and thread count is measured in a fresh Python process (``sys.executable -m
edge_sdk._bench_worker``) so the memory high-water mark is that artifact's alone and
one runtime's threads or caches cannot slow the next one. Latency is timed per call with
``time.perf_counter_ns`` after warm-up and reported as percentiles of all timed calls.
With ``rounds > 1`` the artifacts are measured in alternating order, round after round, so
machine noise hits every variant alike. Artifacts whose runtime is missing here are reported
``"not run"`` with the reason; a worker that fails or crashes gives ``"error"`` and the rest go on.
Accuracy figures are the manifest's validation results; nothing is measured twice or made up.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._bench_worker import host_info, run_job
from edge_sdk._deps import require
from edge_sdk.bundle import Artifact, Bundle
from edge_sdk.errors import BundleError, InferenceError
from edge_sdk.formats import Format
from edge_sdk.runtimes import RUNTIMES, Runtime, all_runtimes, plot_markers

__all__ = [
    "ERROR",
    "NOT_RUN",
    "OK",
    "BenchmarkReport",
    "BenchmarkResult",
    "benchmark_bundle",
    "host_info",
    "rank",
    "store_in_manifest",
]

OK, NOT_RUN, ERROR = "ok", "not run", "error"
VALIDATION_FIELDS = ("passed", "cosine", "top1_agreement", "top1_agreement_confident", "top5_containment",
                     "accuracy", "skipped_reason")
_MB = 1024 * 1024


@dataclass
class BenchmarkResult:
    """The figures of one artifact at one thread count (``None`` where not measured)."""

    key: str
    format: str
    precision: str
    threads: int | None
    status: str = OK  # "ok", "not run" or "error"
    reason: str | None = None
    runtime: str | None = None
    runtime_version: str | None = None
    size_bytes: int = 0
    load_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    min_ms: float | None = None
    throughput: float | None = None  # inferences per second at batch 1: 1000 / mean_ms
    peak_rss_bytes: int | None = None  # high-water RSS of the fresh process
    rss_delta_bytes: int | None = None  # peak minus the interpreter + runtime import baseline
    runs: int = 0  # timed calls, all rounds together
    round_p50_ms: list[float] = field(default_factory=list)
    input_shapes: list[list[int]] = field(default_factory=list)
    load_options: dict[str, Any] = field(default_factory=dict)
    session: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchmarkResult:
        """Inverse of :meth:`to_dict` (unknown keys ignored)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class BenchmarkReport:
    """All results of one benchmark run, with the host it ran on and the settings used."""

    host: dict[str, Any]
    results: list[BenchmarkResult]
    settings: dict[str, Any] = field(default_factory=dict)
    bundle: str = ""
    timestamp: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"bundle": self.bundle, "timestamp": self.timestamp, "host": self.host,
                "settings": self.settings, "results": [r.to_dict() for r in self.results]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchmarkReport:
        """Inverse of :meth:`to_dict`."""
        return cls(host=dict(d.get("host", {})), results=[BenchmarkResult.from_dict(r) for r in d["results"]],
                   settings=dict(d.get("settings", {})), bundle=d.get("bundle", ""),
                   timestamp=d.get("timestamp", ""))

    def get(self, key: str, threads: int | None = None) -> BenchmarkResult:
        """The result of artifact ``key`` (at ``threads``, or the first thread count measured)."""
        for r in self.results:
            if r.key == key and (threads is None or r.threads == threads):
                return r
        raise KeyError(f"no benchmark result for {key}" + (f" at {threads} threads" if threads else ""))

    def _rows(self) -> list[list[str]]:
        rows = []
        for r in self.results:
            v = r.validation
            note = r.reason or ", ".join(f"{k}={val}" for k, val in r.session.items())
            rows.append([r.key, _fmt(r.threads), r.status, _fmt(r.load_ms, 1), _fmt(r.p50_ms, 3),
                         _fmt(r.p95_ms, 3), _fmt(r.p99_ms, 3), _fmt(r.throughput, 1),
                         _fmt(_mb(r.peak_rss_bytes), 1), _fmt(_mb(r.rss_delta_bytes), 1),
                         _fmt(r.size_bytes / _MB, 2), _fmt(v.get("cosine"), 4), _pct(v.get("top1_agreement")),
                         _fmt(v.get("passed")), note])
        return rows

    _HEADERS = ("artifact", "threads", "status", "load ms", "p50 ms", "p95 ms", "p99 ms", "inf/s", "peak RSS MB",
                "ΔRSS MB", "size MB", "cosine", "top-1 agr", "passed", "note")

    def table(self) -> Any:
        """A ``rich.table.Table`` of the results (print it with a rich Console)."""
        from rich.table import Table

        title = f"{self.bundle} on {self.host.get('cpu', '?')} ({self.host.get('logical_cores', '?')} cores)"
        table = Table(title=title)
        for h in self._HEADERS:
            table.add_column(h, justify="left" if h in ("artifact", "status", "note") else "right",
                             overflow="fold")
        for row in self._rows():
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        """The results as a markdown table (plain text)."""
        lines = ["| " + " | ".join(self._HEADERS) + " |", "|" + "---|" * len(self._HEADERS)]
        lines += ["| " + " | ".join(row) + " |" for row in self._rows()]
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike) -> Path:
        """Write a PNG: p50 latency (log y) against file size (log x), one mark per format/precision."""
        require("matplotlib", "bench", "plotting benchmark results")
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        done = [r for r in self.results if r.status == OK and r.p50_ms]
        if not done:
            raise InferenceError("no artifact ran on this host, so there is nothing to plot: "
                                 "install a runtime for one of the bundle's formats")
        markers = plot_markers()  # each runtime names the markers of its formats
        colours = {"fp32": "tab:blue", "fp16": "tab:orange", "int8": "tab:green", "dynamic": "tab:red",
                   "palettized": "tab:purple"}
        fig = Figure(figsize=(8, 5))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        several = len({r.threads for r in done}) > 1
        points = []
        for r in done:
            label = r.key + (f" ({r.threads} thr)" if several else "")
            ax.scatter([r.size_bytes / _MB], [r.p50_ms], marker=markers.get(r.format, "X"),
                       color=colours.get(r.precision, "tab:gray"), s=70, label=label, edgecolors="black",
                       linewidths=0.5)
            points.append((r.size_bytes / _MB, r.p50_ms, label))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.autoscale_view()
        placed: list[tuple[float, float, float]] = []  # label boxes in points: x, y, width (8 pt text)
        for x, y, label in sorted(points, key=lambda p: -p[1]):
            px, py = ax.transData.transform((x, y)) * 72 / fig.dpi
            dy = 4.0
            while any(abs(px - qx) < max(w, 5 * len(label)) and abs(py + dy - qy) < 10 for qx, qy, w in placed):
                dy -= 10  # shift the label down until it does not cover another one
            placed.append((px, py + dy, 5 * len(label)))
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, dy), fontsize=8)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0, 7.0)))
            axis.set_major_formatter(FormatStrFormatter("%g"))
            axis.set_minor_formatter(NullFormatter())
        skipped = [f"{r.key}: {r.status}" for r in self.results if r not in done]
        if skipped:
            fig.text(0.01, 0.01, "not plotted — " + "; ".join(dict.fromkeys(skipped)), fontsize=7, color="dimgray")
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel("p50 latency, batch 1 (ms)")
        ax.set_title(f"{Path(self.bundle).name or 'bundle'} on {self.host.get('cpu', 'this host')}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, format="png", dpi=120)
        return path


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool) or (isinstance(x, int) and not digits):
        return str(x)
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def _mb(x: int | None) -> float | None:
    return None if x is None else x / _MB


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _runtime_of(artifact: Artifact) -> tuple[Runtime | None, str | None]:
    """The runtime that runs ``artifact`` here, or None and why not."""
    try:
        fmt = Format(artifact.format)
    except ValueError:
        return None, f"unknown format {artifact.format!r}: no runtime can run it"
    hint = artifact.runtime.get("runtime")
    candidates = [rt for rt in all_runtimes() if fmt in rt.formats]
    if hint in RUNTIMES:
        candidates.sort(key=lambda rt: rt.name != hint)
    if not candidates:
        return None, f"no registered runtime runs {fmt} artifacts"
    for rt in candidates:
        if rt.is_available():
            return rt, None
    rt = candidates[0]
    if rt.name == "coreml" and sys.platform != "darwin":
        return None, f"Core ML runs only on macOS/iOS (this host is {sys.platform}): benchmark it on a Mac"
    return None, f"{rt.name} is not installed here: pip install \"edge-sdk[{rt.extra}]\""


def _load_options(rt: Runtime, artifact: Artifact) -> dict[str, Any]:
    """The artifact's runtime hints that ``rt.load`` accepts (e.g. OpenVINO precision_hint), as the agent runs it."""
    params = inspect.signature(rt.load).parameters
    return {k: v for k, v in artifact.runtime.items() if k in params and k not in ("path", "threads")}


def _select(bundle: Bundle, keys: Iterable[str] | None) -> list[Artifact]:
    if keys is None:
        return list(bundle.artifacts)
    wanted = [str(k).strip() for k in keys]
    have = {a.key: a for a in bundle.artifacts}
    missing = [k for k in wanted if k not in have]
    if missing:
        raise BundleError(f"bundle {bundle.root} has no artifact {', '.join(missing)}: choose from "
                          f"{', '.join(have) or 'none'}")
    return [have[k] for k in dict.fromkeys(wanted)]


def benchmark_bundle(bundle: Bundle | str | os.PathLike, *, runs: int = 100, warmup: int = 10,
                     threads: Sequence[int | None] = (1,), artifacts: Iterable[str] | None = None,
                     isolate: bool = True, rounds: int = 1, seed: int = 0, timeout: float | None = 600,
                     progress: Callable[[str], None] | None = None) -> BenchmarkReport:
    """Benchmark the bundle's artifacts (all, or the ``artifacts`` keys such as ``"onnx/int8"``).

    Each artifact is measured at each of ``threads`` (None = the runtime's default) in a fresh
    process (``isolate=False`` measures in this process and reports no memory figures) with
    ``warmup`` untimed then ``runs`` timed calls on seeded standard-normal float32 inputs.
    ``rounds > 1`` repeats everything in alternating order and pools the timings.
    ``progress`` receives one line per measurement. ``timeout`` (s) bounds each process.
    """
    if runs < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"runs={runs}, warmup={warmup}, rounds={rounds}: need runs >= 1, warmup >= 0, rounds >= 1")
    thread_list = list(dict.fromkeys(threads)) or [None]
    if any(t is not None and (not isinstance(t, int) or t < 1) for t in thread_list):
        raise ValueError(f"threads {thread_list} must be positive integers (or None for the runtime default)")
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    selected = _select(b, artifacts)
    results: list[BenchmarkResult] = []
    jobs: list[tuple[BenchmarkResult, dict[str, Any]]] = []
    for a in selected:
        rt, reason = _runtime_of(a)
        validation = {k: getattr(a.validation, k) for k in VALIDATION_FIELDS}
        for t in thread_list:
            r = BenchmarkResult(key=a.key, format=a.format, precision=a.precision, threads=t,
                                size_bytes=a.size_bytes, validation=validation)
            results.append(r)
            if rt is None:
                r.status, r.reason = NOT_RUN, reason
                continue
            r.runtime, r.runtime_version = rt.name, rt.version()
            r.load_options = _load_options(rt, a)
            jobs.append((r, {"runtime": rt.name, "path": str(b.path_of(a)), "threads": t, "runs": runs,
                             "warmup": warmup, "seed": seed, "options": r.load_options,
                             "shapes": [s.shape for s in a.inputs]}))
    raw: dict[int, list[dict[str, Any]]] = {id(r): [] for r, _ in jobs}
    done, total = 0, len(jobs) * rounds
    for rnd in range(rounds):
        order = jobs if rnd % 2 == 0 else jobs[::-1]
        for r, job in order:
            if r.status == ERROR:
                continue
            out = run_job(job, isolate=isolate, timeout=timeout)
            done += 1
            if not out.get("ok"):
                r.status, r.reason = ERROR, out.get("error", "unknown failure")
                line = f"error: {r.reason}"
            else:
                raw[id(r)].append(out)
                line = f"p50 {float(np.median(out['latencies_ms'])):.3f} ms"
            if progress:
                progress(f"[{done}/{total}] {r.key} threads={_fmt(r.threads)}: {line}")
    for r, _ in jobs:
        if r.status != ERROR:
            _summarise(r, raw[id(r)], isolate)
    settings = {"runs": runs, "warmup": warmup, "threads": thread_list, "rounds": rounds, "isolate": isolate,
                "seed": seed, "inputs": "seeded standard normal float32"}
    return BenchmarkReport(host=host_info(), results=results, settings=settings, bundle=str(b.root))


def _summarise(r: BenchmarkResult, outs: list[dict[str, Any]], isolate: bool) -> None:
    """Fill ``r``'s figures from the worker outputs of every round."""
    lat = np.concatenate([np.asarray(o["latencies_ms"], dtype=np.float64) for o in outs])
    r.p50_ms, r.p95_ms, r.p99_ms = (float(v) for v in np.percentile(lat, [50, 95, 99]))
    r.mean_ms, r.min_ms = float(lat.mean()), float(lat.min())
    r.throughput = 1000.0 / r.mean_ms if r.mean_ms > 0 else None
    r.runs = int(lat.size)
    r.round_p50_ms = [float(np.median(o["latencies_ms"])) for o in outs]
    r.load_ms = float(np.median([o["load_ms"] for o in outs]))
    r.input_shapes = outs[0]["input_shapes"]
    r.session = outs[0].get("session", {})
    r.runtime_version = outs[0].get("runtime_version") or r.runtime_version
    if isolate:
        peaks = [o["peak_rss_bytes"] for o in outs if o.get("peak_rss_bytes")]
        deltas = [o["peak_rss_bytes"] - o["baseline_rss_bytes"] for o in outs
                  if o.get("peak_rss_bytes") and o.get("baseline_rss_bytes")]
        r.peak_rss_bytes = int(np.median(peaks)) if peaks else None
        r.rss_delta_bytes = int(np.median(deltas)) if deltas else None


def rank(report: BenchmarkReport, metric: str = "p50_ms", *, threads: int | None = None) -> list[str]:
    """Artifact keys that ran, best first by ``metric`` (lower is better; higher for ``throughput``).

    With several thread counts each artifact counts with its best figure, or only ``threads`` if given.
    """
    if metric not in BenchmarkResult.__dataclass_fields__:
        raise ValueError(f"unknown metric {metric!r}: use p50_ms, p95_ms, p99_ms, mean_ms, load_ms, "
                         "throughput, peak_rss_bytes or size_bytes")
    higher_better = metric == "throughput"
    best: dict[str, float] = {}
    for r in report.results:
        value = getattr(r, metric)
        if r.status != OK or value is None or (threads is not None and r.threads != threads):
            continue
        score = -value if higher_better else value
        best[r.key] = min(best.get(r.key, score), score)
    return sorted(best, key=best.__getitem__)


def store_in_manifest(bundle: Bundle | str | os.PathLike, report: BenchmarkReport, *, keep: int = 20) -> Bundle:
    """Append the report to ``manifest.extra["benchmarks"]`` (keeping the last ``keep`` runs) and save atomically.

    Each run is ``{host, timestamp, settings, results: {artifact key: [figures per thread count]}}``;
    validation figures stay where they are (in each artifact) and are not copied.
    """
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    history = b.manifest.extra.setdefault("benchmarks", [])
    if not isinstance(history, list):
        raise BundleError(f"{b.root}: manifest extra.benchmarks is a {type(history).__name__}, not a list: "
                          "remove it from manifest.json and benchmark again")
    per_key: dict[str, list[dict[str, Any]]] = {}
    for r in report.results:
        d = r.to_dict()
        for k in ("key", "format", "precision", "validation"):
            d.pop(k)
        per_key.setdefault(r.key, []).append(d)
    history.append({"host": report.host, "timestamp": report.timestamp, "settings": report.settings,
                    "results": per_key})
    del history[:-max(1, keep)]
    b.save()
    return b
