"""The bundle benchmark on real bundles: real conversions, real runtimes, one fresh process per artifact.

No timing thresholds are asserted (the machine is shared): only the shape and consistency of the figures,
that unavailable runtimes are reported as not run, and that broken artifacts give errors without
stopping the others.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.benchmark import (
    ERROR,
    NOT_RUN,
    OK,
    BenchmarkReport,
    benchmark_bundle,
    rank,
    store_in_manifest,
)
from edge_sdk.bundle import Bundle
from edge_sdk.errors import BundleError

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent
RUNS = 20


def _convert(out: Path, variants: list[tuple[str, str]]) -> Bundle:
    from tiny_models import make_tiny

    import edge_sdk

    calib = np.random.default_rng(0).random((48, 3, 32, 32), dtype=np.float32)
    return edge_sdk.convert(make_tiny(), input_shape=[1, 3, 32, 32], variants=variants, calib=calib, out=out,
                            name="tiny", ort=False, quiet=True)


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """tiny CNN -> onnx fp32 + int8 (a few seconds)."""
    return _convert(tmp_path_factory.mktemp("bench") / "onnx", [("onnx", "fp32"), ("onnx", "int8")])


@pytest.fixture(scope="module")
def onnx_report(onnx_bundle: Bundle) -> BenchmarkReport:
    return benchmark_bundle(onnx_bundle, runs=RUNS, warmup=3)


def _check_figures(report: BenchmarkReport, bundle: Bundle, key: str) -> None:
    r = report.get(key)
    art = next(a for a in bundle.artifacts if a.key == key)
    assert r.status == OK, r.reason
    assert r.runs == RUNS and len(r.round_p50_ms) == 1
    assert 0 < r.min_ms <= r.p50_ms <= r.p95_ms <= r.p99_ms
    assert r.load_ms > 0
    assert r.throughput == pytest.approx(1000 / r.mean_ms)
    assert r.peak_rss_bytes > 20 * 2**20  # a Python process with numpy and a runtime loaded
    assert r.rss_delta_bytes is not None and 0 <= r.rss_delta_bytes < r.peak_rss_bytes
    assert r.size_bytes == art.size_bytes > 0
    assert r.validation["cosine"] == art.validation.cosine and r.validation["passed"] is art.validation.passed
    assert r.input_shapes == [[1, 3, 32, 32]]
    assert r.runtime_version and r.runtime in report.host["runtimes"]


def test_onnx_figures_and_host(onnx_bundle: Bundle, onnx_report: BenchmarkReport) -> None:
    for key in ("onnx/fp32", "onnx/int8"):
        _check_figures(onnx_report, onnx_bundle, key)
    assert onnx_bundle.artifact("onnx", "fp32").size_bytes == (onnx_bundle.root / "onnx/fp32.onnx").stat().st_size
    host = onnx_report.host
    assert host["logical_cores"] >= 1 and host["cpu"] and host["python"].startswith("3.")
    assert host["runtimes"]["onnxruntime"]
    assert sorted(rank(onnx_report)) == ["onnx/fp32", "onnx/int8"]
    p50 = {r.key: r.p50_ms for r in onnx_report.results}
    assert rank(onnx_report) == sorted(p50, key=p50.__getitem__)
    assert rank(onnx_report, "throughput")[0] == max(onnx_report.results, key=lambda r: r.throughput).key
    # the report survives JSON
    again = BenchmarkReport.from_dict(json.loads(json.dumps(onnx_report.to_dict())))
    assert again.to_dict() == onnx_report.to_dict()
    text = onnx_report.markdown()
    assert text.count("\n") == 3 and "onnx/int8" in text


def test_broken_artifact_is_an_error_and_the_others_run(onnx_bundle: Bundle, tmp_path: Path) -> None:
    copy = tmp_path / "broken"
    shutil.copytree(onnx_bundle.root, copy)
    target = copy / "onnx/int8.onnx"
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    lines: list[str] = []
    report = benchmark_bundle(copy, runs=RUNS, warmup=2, progress=lines.append)
    bad, good = report.get("onnx/int8"), report.get("onnx/fp32")
    assert bad.status == ERROR and "cannot load int8.onnx" in bad.reason and "truncated" in bad.reason
    assert bad.p50_ms is None and bad.peak_rss_bytes is None
    assert good.status == OK and good.p50_ms > 0
    assert len(lines) == 2 and any("error" in ln for ln in lines)
    assert rank(report) == ["onnx/fp32"]
    # a worker that does not finish in time is an error too
    slow = benchmark_bundle(copy, runs=RUNS, artifacts=["onnx/fp32"], timeout=0.001)
    assert slow.get("onnx/fp32").status == ERROR and "timed out" in slow.get("onnx/fp32").reason


def test_in_process_threads_rounds_and_selection(onnx_bundle: Bundle) -> None:
    report = benchmark_bundle(onnx_bundle.root, runs=10, warmup=1, threads=(1, 2), artifacts=["onnx/int8"],
                              isolate=False, rounds=2)
    assert [(r.key, r.threads) for r in report.results] == [("onnx/int8", 1), ("onnx/int8", 2)]
    for r in report.results:
        assert r.status == OK and r.runs == 20 and len(r.round_p50_ms) == 2
        assert r.p50_ms <= r.p95_ms <= r.p99_ms
        assert r.peak_rss_bytes is None  # in-process memory is not this artifact's alone
    assert rank(report, threads=2) == ["onnx/int8"]
    with pytest.raises(BundleError, match=r"no artifact tflite/int8.*onnx/fp32"):
        benchmark_bundle(onnx_bundle, artifacts=["tflite/int8"])
    with pytest.raises(ValueError, match="threads"):
        benchmark_bundle(onnx_bundle, threads=(0,))


def test_store_in_manifest_round_trips(onnx_bundle: Bundle, onnx_report: BenchmarkReport, tmp_path: Path) -> None:
    from edge_sdk.schema import validate_manifest

    copy = tmp_path / "b"
    shutil.copytree(onnx_bundle.root, copy)
    store_in_manifest(copy, onnx_report)
    store_in_manifest(Bundle.load(copy), onnx_report)
    data = json.loads((copy / "manifest.json").read_text())
    validate_manifest(data)
    loaded = Bundle.load(copy)
    loaded.verify()  # artifact files untouched
    runs = loaded.manifest.extra["benchmarks"]
    assert len(runs) == 2
    entry = runs[-1]
    assert entry["host"] == onnx_report.host and entry["timestamp"] == onnx_report.timestamp
    assert set(entry["results"]) == {"onnx/fp32", "onnx/int8"}
    stored = entry["results"]["onnx/int8"][0]
    assert stored["p50_ms"] == onnx_report.get("onnx/int8").p50_ms and stored["threads"] == 1
    assert loaded.manifest.artifacts == onnx_bundle.manifest.artifacts
    for _ in range(3):
        store_in_manifest(copy, onnx_report, keep=3)
    assert len(Bundle.load(copy).manifest.extra["benchmarks"]) == 3


def test_plot_writes_png(onnx_report: BenchmarkReport, tmp_path: Path) -> None:
    out = onnx_report.plot(tmp_path / "plot.png")
    blob = out.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 1024


def test_compare_variants_script(onnx_bundle: Bundle, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/compare_variants.py"), str(onnx_bundle.root),
                           "--runs", "10", "--warmup", "2", "--rounds", "2", "--json", str(tmp_path / "r.json")],
                          capture_output=True, text=True, check=True, timeout=300)
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| onnx")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    report = BenchmarkReport.from_dict(json.loads((tmp_path / "r.json").read_text()))
    fp32, int8 = report.get("onnx/fp32"), report.get("onnx/int8")
    assert cells[:4] == ["onnx", "onnxruntime", "1", "int8"]
    assert cells[6] == f"{int8.p50_ms / fp32.p50_ms:.2f}×"
    assert cells[8] == f"{int8.size_bytes / fp32.size_bytes:.2f}×"
    assert cells[7].endswith("/2")
    assert cells[9] == f"{100 * int8.validation['top1_agreement']:.1f}%"


@pytest.mark.slow
def test_every_format_and_core_ml_not_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    variants = [("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"), ("openvino", "int8"), ("tflite", "fp32"),
                ("coreml", "fp32")]
    bundle = _convert(tmp_path_factory.mktemp("bench") / "all", variants)
    report = benchmark_bundle(bundle, runs=RUNS, warmup=3)
    assert [r.key for r in report.results] == [f"{f}/{p}" for f, p in variants]
    for key in ("onnx/fp32", "onnx/int8", "openvino/fp32", "openvino/int8", "tflite/fp32"):
        _check_figures(report, bundle, key)
    assert report.get("openvino/fp32").runtime == "openvino" and report.get("tflite/fp32").runtime == "litert"
    assert report.get("openvino/int8").load_options.get("precision_hint") == "f32"  # as the manifest says
    coreml = report.get("coreml/fp32")
    if sys.platform != "darwin":
        assert coreml.status == NOT_RUN and "macOS" in coreml.reason
        assert coreml.p50_ms is None and coreml.load_ms is None and coreml.peak_rss_bytes is None
        assert coreml.size_bytes == bundle.artifact("coreml", "fp32").size_bytes
        assert "coreml/fp32" not in rank(report)
    blob = report.plot(tmp_path_factory.mktemp("plot") / "all.png").read_bytes()
    assert blob[:4] == b"\x89PNG" and len(blob) > 1024
