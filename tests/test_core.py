"""Fast unit tests of the core: no framework is imported here."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edge_sdk.baseline import compute_baseline, psi
from edge_sdk.bundle import Artifact, Bundle, Manifest, Validation, atomic_bundle_dir, sha256_path
from edge_sdk.calibration import load_samples
from edge_sdk.errors import BundleError, CalibrationError
from edge_sdk.formats import Format, Precision, parse_list
from edge_sdk.preprocessing import Preprocessing, decode_image
from edge_sdk.schema import validate_manifest

HEAVY = ("torch", "tensorflow", "openvino", "nncf", "coremltools", "onnx2tf", "litert_torch", "keras")


def _import_check(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\nprint(json.dumps(sorted(m for m in "
                          f"{HEAVY!r} if m in sys.modules)))"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_edge_sdk_loads_no_heavy_framework() -> None:
    code = ("import edge_sdk, edge_sdk.converters, edge_sdk.runtimes as r\n"
            "from edge_sdk.converters.pipeline import load_builtin_converters\nload_builtin_converters()\n"
            "r.all_runtimes()")
    assert _import_check(code) == []


def test_cli_help_loads_no_heavy_framework() -> None:
    code = ("import contextlib, io\nfrom edge_sdk.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['convert', '--help'])")
    assert _import_check(code) == []


def test_enum_parsing_lists_choices() -> None:
    assert parse_list("int8, fp32,int8", Precision) == [Precision.INT8, Precision.FP32]
    with pytest.raises(ValueError, match="unknown format 'tensorrt': choose from tflite"):
        parse_list("onnx,tensorrt", Format)


def _manifest(tmp: Path) -> Manifest:
    (tmp / "onnx").mkdir()
    f = tmp / "onnx" / "fp32.onnx"
    f.write_bytes(b"model-bytes")
    art = Artifact("onnx", "fp32", "onnx/fp32.onnx", sha256_path(f), f.stat().st_size,
                   validation=Validation(passed=True, cosine=1.0))
    return Manifest(name="m", version="1", source={"framework": "onnx", "file": "m.onnx", "sha256": "0" * 64},
                    artifacts=[art])


def test_bundle_roundtrip_verify_and_tamper(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    b = Bundle(root, _manifest(root))
    validate_manifest(b.manifest.to_dict())
    b.save()
    again = Bundle.load(root)
    assert again.manifest.to_dict() == b.manifest.to_dict()
    again.verify()
    (root / "onnx" / "fp32.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="does not match its sha256"):
        again.verify()


def test_archive_roundtrip_and_unsafe_members(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    b = Bundle(root, _manifest(root))
    b.save()
    arc = b.archive(tmp_path / "b.tar.gz")
    back = Bundle.extract(arc, tmp_path / "unpacked")
    back.verify()
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("../escape.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(BundleError, match="unsafe archive member"):
        Bundle.extract(evil, tmp_path / "evil_out")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "evil_out").exists()


def test_atomic_bundle_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_bundle_dir(dest) as tmp:
        (tmp / "half.bin").write_bytes(b"partial")
        raise RuntimeError("boom")
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []


def test_schema_rejects_bad_manifest(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    d = _manifest(root).to_dict()
    d["artifacts"][0]["precision"] = "int3"
    d["artifacts"][0]["path"] = "../../etc/passwd"
    with pytest.raises(BundleError) as err:
        validate_manifest(d)
    assert "precision" in str(err.value) and "path" in str(err.value)


def test_load_samples_shapes_and_errors(tmp_path: Path) -> None:
    arr = np.random.default_rng(0).random((12, 3, 8, 8), dtype=np.float32)
    np.save(tmp_path / "c.npy", arr)
    s = load_samples(tmp_path / "c.npy", input_shapes=[[1, 3, 8, 8]])
    assert len(s) == 12 and s.sample(3)[0].shape == (1, 3, 8, 8)
    np.testing.assert_array_equal(s.sample(3)[0][0], arr[3])
    with pytest.raises(CalibrationError, match=r"shape \['N', 3, 8, 8\] but the model input is \[1, 3, 16, 16\]"):
        s.check([[1, 3, 16, 16]], "calibration")
    bad = arr.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match="NaN"):
        load_samples(bad, input_shapes=[[1, 3, 8, 8]]).check([[1, 3, 8, 8]], "calibration")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(CalibrationError, match=r"not a readable \.npy"):
        load_samples(tmp_path / "junk.npy")
    with pytest.raises(CalibrationError, match="does not exist"):
        load_samples(tmp_path / "missing.npy")
    gen = load_samples(lambda: (arr[i] for i in range(5)), input_shapes=[[1, 3, 8, 8]])
    assert len(gen) == 5 and gen.arrays[0].shape == (5, 3, 8, 8)


def test_image_folder_with_preprocessing(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, :, 2] = 255  # pure red in BGR
    cv2.imwrite(str(tmp_path / "red.png"), img)
    (tmp_path / "notes.txt").write_text("ignored")
    pre = Preprocessing(size=(16, 16), color="RGB", layout="NCHW", scale=1 / 255)
    s = load_samples(tmp_path, preprocessing=pre)
    x = s.arrays[0]
    assert x.shape == (1, 3, 16, 16)
    assert np.allclose(x[0, 0], 1.0) and np.allclose(x[0, 1:], 0.0)  # RGB order: red first
    with pytest.raises(CalibrationError, match="needs declared preprocessing"):
        load_samples(tmp_path)
    from edge_sdk.errors import InputError

    with pytest.raises(InputError, match="not a decodable image"):
        decode_image(b"definitely not a jpeg")


def test_baseline_and_psi() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 0.1, (64, 3, 8, 8)).astype(np.float32)
    logits = rng.normal(0, 3, (64, 10))
    base = compute_baseline(x, "NCHW", logits, classifier=True)
    assert len(base["input_channels"]) == 3
    assert abs(base["input_channels"][0]["mean"] - 0.5) < 0.02
    assert abs(sum(base["confidence"]["fractions"]) - 1) < 1e-9
    same = base["input_channels"][0]["hist_fractions"]
    assert psi(same, same) < 1e-9
    shifted = np.histogram(rng.normal(0.7, 0.1, 4096), bins=base["input_channels"][0]["hist_edges"])[0]
    assert psi(same, shifted / shifted.sum()) > 0.2
