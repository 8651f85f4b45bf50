"""The convert pipeline end to end through the CLI: real conversions (ONNX target), bad input, validation failures."""

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

    d = tmp_path_factory.mktemp("tiny")
    m = make_tiny()
    torch.save(m.state_dict(), d / "tiny.pt")
    rng = np.random.default_rng(0)
    calib = rng.random((64, 3, 32, 32), dtype=np.float32)
    np.save(d / "calib.npy", calib)
    np.save(d / "calib_wrong.npy", calib[:, :, :16, :16])
    blob = (d / "tiny.pt").read_bytes()
    (d / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    return {"dir": d, "pt": d / "tiny.pt", "calib": d / "calib.npy", "calib_wrong": d / "calib_wrong.npy",
            "truncated": d / "truncated.pt"}


def _run(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


BASE = ["--model-class", "tiny_models:TinyCNN", "--input-shape", "1,3,32,32"]


def test_convert_onnx_fp32_int8_bundle(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "bundle"
    code, stdout, _ = _run(capsys, "convert", tiny["pt"], *BASE, "--to", "onnx", "--precision", "fp32,int8",
                           "--calib", tiny["calib"], "--out", out, "--name", "tiny", "--version", "3", "--json")
    summary = json.loads(stdout)
    assert code == 0, summary
    b = Bundle.load(out)
    b.verify()
    keys = {a.key for a in b.artifacts}
    assert keys == {"onnx/fp32", "onnx/int8", "ort/fp32", "ort/int8"}
    m = b.manifest
    assert (m.name, m.version, m.source["framework"]) == ("tiny", "3", "pytorch")
    assert m.source["sha256"] and len(m.baseline["input_channels"]) == 3
    fp32, int8 = b.artifact("onnx", "fp32"), b.artifact("onnx", "int8")
    assert fp32.validation.passed and fp32.validation.cosine > 0.9999
    assert int8.validation.passed and int8.validation.cosine > 0.95
    assert int8.size_bytes <= 0.30 * fp32.size_bytes
    assert int8.validation.samples == 20  # held out from the 64 calibration samples
    # the bundle's own copy runs and agrees with torch
    from tiny_models import make_tiny

    from edge_sdk.runtimes import get_runtime

    x = np.random.default_rng(5).random((1, 3, 32, 32), dtype=np.float32)
    sess = get_runtime("onnxruntime").load(b.path_of(fp32))
    got = sess.run([x])[0]
    want = make_tiny()(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--input-shape", "1,3,20,20"], "rejects inputs of shape"),
        (["--precision", "int8", "--no-calib"], "int8 needs calibration data"),
        (["--truncated"], "truncated or corrupt"),
        (["--to", "onnx,tensorrt"], "unknown format 'tensorrt'"),
        (["--precision", "fp32,int3"], "unknown precision 'int3'"),
        (["--precision", "palettized"], "cannot be produced in palettized"),
        (["--precision", "int8", "--calib-wrong"], "calibration samples have shape"),
        (["--model-class", "tiny_models:Nope"], "has no class 'Nope'"),
    ],
)
def test_bad_input_one_line_error_nothing_written(tiny: dict, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  args: list[str], message: str) -> None:
    src, calib = tiny["pt"], ["--calib", str(tiny["calib"])]
    extra = []
    for a in args:
        if a == "--truncated":
            src = tiny["truncated"]
        elif a == "--no-calib":
            calib = []
        elif a == "--calib-wrong":
            calib = ["--calib", str(tiny["calib_wrong"])]
        else:
            extra.append(a)
    base = list(BASE)
    for flag in ("--input-shape", "--model-class"):
        if flag in extra:
            i = base.index(flag)
            del base[i:i + 2]
    out = tmp_path / "out"
    code, _, err = _run(capsys, "convert", src, *base, "--to", "onnx", *calib, *extra, "--out", out)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no partial temp bundle


def test_onnx_source_to_coreml_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tiny_models import make_tiny

    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(make_tiny(), (torch.zeros(1, 3, 32, 32),), str(onnx_path), dynamo=False)
    code, _, err = _run(capsys, "convert", onnx_path, "--to", "coreml", "--out", tmp_path / "o")
    assert code == 2 and "no converter from onnx to coreml" in err
    assert not (tmp_path / "o").exists()


def test_failed_validation_left_out_unless_keep_failed(tiny: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    strict = ["--tolerance", "int8:min_cosine=0.9999999"]
    out = tmp_path / "b"
    code, _, err = _run(capsys, "convert", tiny["pt"], *BASE, "--to", "onnx", "--no-ort", "--precision",
                        "fp32,int8", "--calib", tiny["calib"], "--out", out, *strict)
    assert code == 1
    assert "onnx/int8: plain int8 loses too much on this model: cosine" in err and "left out of the bundle" in err
    assert {a.key for a in Bundle.load(out).artifacts} == {"onnx/fp32"}
    out2 = tmp_path / "b2"
    code, _, _ = _run(capsys, "convert", tiny["pt"], *BASE, "--to", "onnx", "--no-ort", "--precision",
                      "fp32,int8", "--calib", tiny["calib"], "--out", out2, "--keep-failed", *strict)
    assert code == 1
    kept = Bundle.load(out2).artifact("onnx", "int8")
    assert kept.validation.passed is False and kept.validation.failures
    # an existing bundle is never clobbered without --overwrite
    code, _, err = _run(capsys, "convert", tiny["pt"], *BASE, "--to", "onnx", "--out", out2)
    assert code == 2 and "already exists" in err
    assert Bundle.load(out2).artifact("onnx", "int8").validation.passed is False


def test_python_api_module_and_iterable_calibration(tmp_path: Path) -> None:
    from tiny_models import make_tiny

    import edge_sdk

    model = make_tiny(seed=3)
    rng = np.random.default_rng(1)
    samples = [rng.random((1, 3, 32, 32), dtype=np.float32) for _ in range(48)]
    bundle = edge_sdk.convert(model, input_shape=[1, 3, 32, 32], to=["onnx"], precision=["fp32", "int8"],
                              calib=lambda: iter(samples), out=tmp_path / "api", ort=False, quiet=True)
    assert {a.key for a in bundle.artifacts} == {"onnx/fp32", "onnx/int8"}
    assert bundle.manifest.source["kind"] == "module" and bundle.manifest.source["sha256"] is None
    assert bundle.manifest.extra["calibration_samples"] == 28  # 20 of 48 held out for validation
    assert all(a.validation.passed for a in bundle.artifacts)


def test_image_folder_calibration_records_preprocessing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cv2 = pytest.importorskip("cv2")
    skdata = pytest.importorskip("skimage.data")
    from tiny_models import make_tiny

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        rgb = getattr(skdata, name)()
        for k in range(3):  # a few crops per photo
            h, w = rgb.shape[:2]
            crop = rgb[k * h // 8: h - k * h // 8, k * w // 8: w - k * w // 8]
            cv2.imwrite(str(folder / f"{name}_{k}.jpg"), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    src = tmp_path / "tiny.pt"
    torch.save(make_tiny().state_dict(), src)
    code, _, err = _run(capsys, "convert", src, *BASE, "--to", "onnx", "--no-ort", "--precision", "int8",
                        "--calib", folder, "--resize", "32x32", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25",
                        "--out", tmp_path / "b")
    assert code == 0, err
    m = Bundle.load(tmp_path / "b").manifest
    assert m.preprocessing["size"] == [32, 32] and m.preprocessing["mean"] == [0.5, 0.5, 0.5]
    assert m.preprocessing["color"] == "RGB" and m.preprocessing["layout"] == "NCHW"
    assert m.extra["calibration_samples"] == 12
    # the baseline was measured on the preprocessed photos: (x/255 - 0.5) / 0.25 lies in [-2, 2]
    for ch in m.baseline["input_channels"]:
        assert -2.01 <= ch["min"] < ch["max"] <= 2.01
