"""The evaluation gate (issue 6, acceptance 5): promote refuses a worse model, accepts a better one, and
``--force`` records its reason.

The acceptance test uses real models and real data: three Fashion-MNIST CNNs of clearly different quality (the
project's training recipe, ``examples/train.py``, on 300 / 1,500 / 8,000 training images), converted to ONNX
bundles and evaluated by the device Agent on 1,000 images of the Fashion-MNIST test split.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fleet_helpers import sqlite_db

from edge_sdk.bundle import Bundle
from edge_sdk.cli import main
from edge_sdk.errors import EdgeSDKError
from edge_sdk.fleet.lifecycle.gate import GateError, evaluate_on_holdout, gate
from edge_sdk.fleet.lifecycle.registry import Registry, RegistryError


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and "Traceback" not in text, text
    return text


def result(accuracy: float, samples: int = 1000, sha: str = "h") -> dict[str, Any]:
    return {"accuracy": accuracy, "samples": samples, "holdout_sha256": sha}


def test_gate_arithmetic() -> None:
    ok = gate(result(0.8960), result(0.9000), 0.5, candidate="m:2", active="m:1")
    assert ok.accepted and ok.figures["delta_pp"] == pytest.approx(-0.4)
    assert "m:2 89.60% vs active m:1 90.00%" in ok.reason and "tolerance 0.5 pp" in ok.reason
    assert gate(result(0.895), result(0.900), 0.5).accepted  # exactly at the tolerance
    refused = gate(result(0.8940), result(0.9000), 0.5)
    assert not refused.accepted and "-0.60 pp" in refused.reason
    assert gate(result(0.95), result(0.90), 0.0).accepted
    assert not gate(result(0.8999), result(0.9000), 0.0).accepted
    with pytest.raises(EdgeSDKError):
        gate(result(0.9), result(0.9), -1)
    with pytest.raises(EdgeSDKError) as exc:
        gate(result(0.9, sha="a"), result(0.9, sha="b"), 0.5)
    assert "different holdout sets" in one_line(exc)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    from tiny_models import make_tiny

    import edge_sdk

    d = tmp_path_factory.mktemp("gate_tiny")
    torch.save(make_tiny().state_dict(), d / "tiny.pt")
    edge_sdk.convert(d / "tiny.pt", model_class="tiny_models:TinyCNN", input_shape=[1, 3, 32, 32], to="onnx",
                     precision="fp32", ort=False, out=d / "bundle", name="tiny", version="1", quiet=True)
    return d / "bundle"


def test_evaluate_on_holdout_runs_the_device_agent(tiny: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(str(tiny / "onnx/fp32.onnx"), providers=["CPUExecutionProvider"])
    truth = np.array([int(sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[0].argmax()) for i in range(50)])
    labels = truth.copy()
    labels[:10] = (labels[:10] + 1) % 10  # 10 of 50 wrong
    np.savez(tmp_path / "h.npz", inputs=x, labels=labels)
    r = evaluate_on_holdout(tiny, tmp_path / "h.npz")
    assert r["samples"] == 50 and r["correct"] == 40 and r["accuracy"] == pytest.approx(0.8)
    assert r["runtime"] == "onnxruntime" and r["artifact"] == "onnx/fp32" and r["model"] == "tiny:1"
    assert len(r["holdout_sha256"]) == 64
    assert evaluate_on_holdout(tiny, (x, truth))["accuracy"] == 1.0
    with pytest.raises(EdgeSDKError) as exc:
        evaluate_on_holdout(tiny, (x.transpose(0, 2, 3, 1), truth))  # NHWC for an NCHW model
    assert "expects [N, 3, 32, 32]" in one_line(exc)


def test_promote_rules_without_real_models(tiny: Path, tmp_path: Path) -> None:
    v2 = Path(shutil.copytree(tiny, tmp_path / "v2"))
    b = Bundle.load(v2)
    b.manifest.version = "2"
    b.save()
    with sqlite_db(tmp_path) as db:
        reg = Registry(db, tmp_path / "store")
        reg.add(tiny)
        reg.add(v2)
        first = reg.promote("tiny", "1", allow_unsigned=True)  # nothing active yet: accepted without comparison
        assert first.decision.accepted and first.record.state == "canary" and "no active version" in \
            first.decision.reason
        with pytest.raises(RegistryError):
            reg.promote("tiny", "1", allow_unsigned=True)  # already canary
        reg.activate("tiny", "1", "rolled out")
        with pytest.raises(GateError) as exc:
            reg.promote("tiny", "2", allow_unsigned=True)  # an active version but no holdout set: nothing to judge by
        assert "no holdout set is registered for tiny" in one_line(exc) and "--force" in str(exc.value)
        assert reg.show("tiny", "2").state == "candidate"
        with pytest.raises(RegistryError):
            reg.promote("tiny", "2", force_reason="  ", allow_unsigned=True)
        forced = reg.promote("tiny", "2", force_reason="hotfix ticket 42", allow_unsigned=True)
        assert forced.forced and forced.record.force_reason == "hotfix ticket 42"
        assert "hotfix ticket 42" in reg.transitions("tiny", "2")[-1]["reason"]


# ---- acceptance 5: real Fashion-MNIST models ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three Fashion-MNIST CNN bundles of different quality, their torch accuracy on the holdout, the holdout."""
    torch = pytest.importorskip("torch")
    from data import fashion_tensors
    from train import train_torch_fashion

    import edge_sdk

    d = tmp_path_factory.mktemp("gate_fashion")
    x, y = fashion_tensors("test", "NCHW", n=1000)
    np.savez(d / "holdout.npz", inputs=x, labels=y)
    out: dict[str, Any] = {"holdout": d / "holdout.npz", "torch_accuracy": {}, "bundle": {}}
    # version 1 = the active model, 2 = a worse one, 3 = a better one
    for version, n_train in (("1", 1500), ("2", 300), ("3", 8000)):
        model, _ = train_torch_fashion(n_train=n_train, seed=0)
        with torch.no_grad():
            pred = model(torch.from_numpy(x)).argmax(1).numpy()
        out["torch_accuracy"][version] = float((pred == y).mean())
        torch.save(model.state_dict(), d / f"cnn{version}.pt")
        edge_sdk.convert(d / f"cnn{version}.pt", model_class="torch_models:FashionCNN", input_shape=[1, 1, 28, 28],
                         to="onnx", precision="fp32", ort=False, out=d / f"b{version}", name="fmnist",
                         version=version, quiet=True)
        out["bundle"][version] = d / f"b{version}"
    return out


@pytest.mark.slow
def test_gate_refuses_worse_accepts_better_with_real_models(fashion_bundles: dict[str, Any], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    acc = fashion_bundles["torch_accuracy"]
    assert acc["2"] + 0.05 < acc["1"] < acc["3"] - 0.05, acc  # the three really differ in quality
    with sqlite_db(tmp_path) as db:
        db_url = f"sqlite:///{tmp_path / 'fleet.db'}"
        reg = Registry(db, tmp_path / "store")
        for v in ("1", "2", "3"):
            reg.add(fashion_bundles["bundle"][v])
        holdout = reg.register_holdout("fmnist", fashion_bundles["holdout"])
        assert holdout.samples == 1000
        reg.promote("fmnist", "1", allow_unsigned=True)
        reg.activate("fmnist", "1", "the fleet runs it")

        # the worse model is refused with one line naming both accuracies and the tolerance
        with pytest.raises(GateError) as exc:
            reg.promote("fmnist", "2", tolerance_pp=0.5, allow_unsigned=True)
        msg = one_line(exc)
        fig = exc.value.decision.figures
        cand, active = fig["candidate"], fig["active"]
        assert f"{100 * cand['accuracy']:.2f}%" in msg and f"{100 * active['accuracy']:.2f}%" in msg
        assert "tolerance 0.5 pp" in msg and "--force" in msg
        assert cand["samples"] == active["samples"] == 1000 and cand["runtime"] == "onnxruntime"
        # the device Agent's accuracy (ONNX Runtime) is the source model's, within two of 1,000 samples
        assert abs(cand["accuracy"] - acc["2"]) <= 0.002 and abs(active["accuracy"] - acc["1"]) <= 0.002
        assert reg.show("fmnist", "2").state == "candidate"
        assert reg.show("fmnist", "2").holdout_result["accuracy"] == cand["accuracy"]

        # the CLI says the same on one line and exits 2; --force promotes and records the reason
        assert main(["registry", "promote", "fmnist", "2", "--db", db_url, "--store", str(tmp_path / "store"),
                     "--allow-unsigned"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: promotion of fmnist:2 refused") and "\n" not in err
        assert main(["registry", "promote", "fmnist", "2", "--force", "customer demo needs the small model",
                     "--db", db_url, "--allow-unsigned"]) == 0
        assert "FORCED (customer demo needs the small model)" in capsys.readouterr().out
        forced = reg.show("fmnist", "2")
        assert forced.state == "canary" and forced.force_reason == "customer demo needs the small model"
        last = reg.transitions("fmnist", "2")[-1]
        assert last["to_state"] == "canary" and last["figures"]["forced"] is True
        assert "customer demo needs the small model" in last["reason"]

        # the better model passes the gate
        better = reg.promote("fmnist", "3", allow_unsigned=True)
        assert better.decision.accepted and not better.forced and better.record.state == "canary"
        assert better.decision.figures["delta_pp"] > 5 and better.record.force_reason is None
        assert abs(better.decision.figures["candidate"]["accuracy"] - acc["3"]) <= 0.002
        print(f"\nholdout accuracy (1000 Fashion-MNIST test images, ONNX Runtime via the device Agent): "
              f"active fmnist:1 {100 * active['accuracy']:.1f}%, worse fmnist:2 {100 * cand['accuracy']:.1f}% "
              f"(refused), better fmnist:3 {100 * better.decision.figures['candidate']['accuracy']:.1f}% (accepted)")
