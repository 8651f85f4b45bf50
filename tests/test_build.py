"""`edge-sdk build --target`: real conversions, real benchmark, selection recorded with its reasons."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.bundle import Bundle
from edge_sdk.cli import main

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tiny_models import make_tiny

    d = tmp_path_factory.mktemp("build")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    np.save(d / "calib.npy", np.random.default_rng(0).random((64, 3, 32, 32), dtype=np.float32))
    return {"pt": d / "tiny.pt", "calib": d / "calib.npy"}


ARGS = ["--model-class", "tiny_models:TinyCNN", "--input-shape", "1,3,32,32"]


def _build(capsys: pytest.CaptureFixture, tiny: dict, out: Path, *extra: str) -> tuple[int, dict | None, str]:
    code = main(["build", str(tiny["pt"]), *ARGS, "--calib", str(tiny["calib"]), "--out", str(out), "--json",
                 "--runs", "20", *extra])
    cap = capsys.readouterr()
    return code, (json.loads(cap.out) if code == 0 else None), cap.err


@pytest.mark.slow
def test_build_x86_openvino_benchmarks_and_selects_fastest_eligible(tiny: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    code, info, err = _build(capsys, tiny, tmp_path / "b", "--target", "x86-openvino")
    assert code == 0, err
    b = Bundle.load(tmp_path / "b")
    b.verify()
    assert {a.key for a in b.artifacts} == {"openvino/int8", "openvino/fp16", "openvino/fp32", "onnx/int8",
                                            "onnx/fp32"}
    build = b.manifest.extra["build"]
    assert build == {k: v for k, v in info.items() if k != "bundle"}
    assert build["benchmarked_on_host"] is True and b.manifest.extra["benchmarks"]
    cands = {c["key"]: c for c in build["candidates"]}
    chosen = cands[build["selected"]]
    assert chosen["eligible"] and chosen["p50_ms"] > 0
    others = [c["p50_ms"] for c in cands.values() if c["eligible"] and c["key"] != chosen["key"]]
    assert all(chosen["p50_ms"] <= p * 1.10 + 1e-9 for p in others)  # fastest, up to the documented tie margin
    if chosen["fp32_p50_ms"] and chosen["p50_ms"] > chosen["fp32_p50_ms"]:
        assert "SLOWER than fp32" in build["reason"]


@pytest.mark.slow
def test_build_for_device_not_benchmarked_here(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _build(capsys, tiny, tmp_path / "b", "--target", "rpi4")
    assert code == 0, err
    build = Bundle.load(tmp_path / "b").manifest.extra["build"]
    assert build["benchmarked_on_host"] is False and build["p50_ms"] is None
    assert "not benchmarked on target hardware" in build["reason"]
    assert all(c["p50_ms"] is None for c in build["candidates"])
    # rpi4's first eligible preference is picked; arm .ort layout was requested from the profile
    first = next(c for c in build["candidates"] if c["eligible"])
    assert build["selected"] == first["key"]


def test_unknown_target_lists_known_ones(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _build(capsys, tiny, tmp_path / "b", "--target", "rpi3")
    assert code == 2 and "unknown target 'rpi3'" in err and "x86-openvino" in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1
    assert not (tmp_path / "b").exists()


def test_malformed_profile_names_file_and_field(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "mine.toml"
    bad.write_text('description = "x"\narch = "arm64"\n[[candidates]]\nformat = "tflite"\nprecision = "int3"\n')
    code, _, err = _build(capsys, tiny, tmp_path / "b", "--target", str(bad))
    assert code == 2 and "mine.toml" in err and "precision" in err and "int3" in err
    assert not (tmp_path / "b").exists()


def test_target_the_source_cannot_serve(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tiny_models import make_tiny

    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(make_tiny(), (torch.zeros(1, 3, 32, 32),), str(onnx_path), dynamo=False)
    code = main(["build", str(onnx_path), "--target", "ios", "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and "none of the requested variants can be produced from a onnx source" in err
    assert not (tmp_path / "b").exists()


def test_targets_command_lists_every_profile(capsys: pytest.CaptureFixture) -> None:
    assert main(["targets", "--json"]) == 0
    names = {p["name"] for p in json.loads(capsys.readouterr().out)}
    assert {"rpi4", "rpi5", "coral-edgetpu", "ios", "android", "x86-openvino", "host"} <= names


def test_check_command_on_an_existing_bundle(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "b"
    assert main(["convert", str(tiny["pt"]), *ARGS, "--to", "onnx", "--precision", "fp32", "--out", str(out),
                 "--ort-platform", "arm", "--json"]) == 0
    capsys.readouterr()
    assert main(["check", str(out), "--target", "android", "--json"]) == 0
    reports = {r["artifact"]: r for r in json.loads(capsys.readouterr().out)}
    assert reports["ort/fp32"]["ok"] and "ort/fp32" in reports
    code = main(["check", str(out), "--target", "ios"])
    err = capsys.readouterr().err
    assert code == 2 and "has none of the artifacts target 'ios' needs" in err and "onnx/fp32" in err
