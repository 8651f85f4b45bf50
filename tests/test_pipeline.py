"""The retraining pipeline (issue 18 items 3 and 4) with real parts: Fashion-MNIST, the cached FashionCNN (v1), real
ONNX conversion, a real SQLite registry with signed bundles, the device Agent as the gate's evaluator, the
machine's Mosquitto for the staged rollout's commands, and the alert webhook over real HTTP.

The drifted slice: 3000 Fashion-MNIST training images darkened to 40 % brightness (``x * 0.4``), exported as PNGs in
``edge-sdk data export``'s folder format (/tmp/h/export_format.md), all labelled but 200 extra unlabelled rows.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mqtt_helpers import SYSTEM_BROKER, Subscriber, require_system_broker, unique_fleet, wait_until

from edge_sdk.pipeline import PipelineBusy, PipelineConfigError, PipelineError, load_config, run_pipeline

COLUMNS = "sha256,file,fleet,device,model_name,model_version,prediction,confidence,label,policy,captured_at"
N_ORIGINAL = 6000  # original training rows the fine-tune mixes in (the first 6000 of the training split)
DRIFT = slice(57000, 60000)  # the training images that come back darkened from the devices
DEVICES = [f"dev{i:02d}" for i in range(20)]


def write_export(folder: Path, images: np.ndarray, labels: np.ndarray | None, *, fleet: str = "f1",
                 unlabelled: int = 0, extra_rows: list[list[str]] | None = None) -> Path:
    """An export folder in the contract's format: images/<sha256>.png, samples.csv/.json, export.json."""
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(np.round(img.reshape(28, 28) * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
        data = buf.getvalue()
        sha = hashlib.sha256(data).hexdigest()
        (folder / "images" / f"{sha}.png").write_bytes(data)
        label = "" if labels is None or i >= len(images) - unlabelled else str(int(labels[i]))
        rows.append([sha, f"images/{sha}.png", fleet, DEVICES[i % len(DEVICES)], "fashion", "1", str(i % 10),
                     "0.41", label, "drift", "2026-12-06T20:00:00Z"])
    rows += extra_rows or []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS.split(","))
    w.writerows(rows)
    text = buf.getvalue().encode()
    (folder / "samples.csv").write_bytes(text)
    (folder / "samples.json").write_text(json.dumps([dict(zip(COLUMNS.split(","), r, strict=True)) for r in rows]))
    (folder / "export.json").write_text(json.dumps({
        "fleet": fleet, "filters": {"labelled": False}, "count": len(rows),
        "bytes": sum(p.stat().st_size for p in (folder / "images").iterdir()),
        "created_at": "2026-12-06T21:00:00Z", "sha256_of_samples_csv": hashlib.sha256(text).hexdigest()}))
    return folder


class World:
    """v1 registered (signed, active), the data files and an export folder of darkened, labelled samples."""

    def __init__(self, root: Path, cnn: Any, fashion_test: tuple[np.ndarray, np.ndarray]) -> None:
        import torch
        from data import FASHION_CLASSES, fashion_tensors

        import edge_sdk
        from edge_sdk.fleet.db import Database
        from edge_sdk.fleet.lifecycle.registry import Registry
        from edge_sdk.preprocessing import Preprocessing
        from edge_sdk.signing import generate_keypair, sign_bundle

        self.root = root
        self.key, _pub = generate_keypair(root / "keys", "release")
        torch.save(cnn.state_dict(), root / "v1.pt")
        xtr, ytr = fashion_tensors("train", "NCHW")
        xte, yte = fashion_test
        np.savez(root / "original.npz", inputs=xtr[:N_ORIGINAL], labels=ytr[:N_ORIGINAL])
        np.savez(root / "test.npz", inputs=xte, labels=yte)
        np.savez(root / "test_small.npz", inputs=xte[:2000], labels=yte[:2000])  # runs not about the gate's precision
        self.dark = (xtr[DRIFT] * 0.4).astype(np.float32)
        self.dark_labels = ytr[DRIFT]
        edge_sdk.convert(root / "v1.pt", model_class="torch_models:FashionCNN", input_shape=[1, 1, 28, 28],
                         dynamic="batch", to="onnx", precision="fp32", ort=False, out=root / "v1",
                         preprocessing=Preprocessing(size=(28, 28), color="GRAY", layout="NCHW"),
                         labels=list(FASHION_CLASSES), name="fashion", version="1", quiet=True,
                         val=xte[:200], val_labels=yte[:200])
        sign_bundle(root / "v1", self.key)
        self.db_url = f"sqlite:///{root / 'fleet.db'}"
        with Database.connect(self.db_url) as db:
            db.migrate()
            reg = Registry(db, root / "registry", trusted_keys=str(root / "keys"))
            reg.add(root / "v1")
            reg.activate("fashion", "1", "v1 runs in the fleet")
        unlabelled = (xtr[56800:57000] * 0.4).astype(np.float32)
        self.export = write_export(root / "export", np.concatenate([self.dark, unlabelled]),
                                   np.concatenate([self.dark_labels, np.zeros(200, np.int64)]), unlabelled=200,
                                   extra_rows=[["0" * 64, "../v1.pt", "f1", "dev00", "fashion", "1", "0", "0.5", "1",
                                                "random", "2026-12-06T20:00:00Z"]])

    def config(self, name: str, *, epochs: int = 1, deploy: bool = True, fleet: str = "f1", min_gain_pp: float = 2.0,
               extra: str = "", samples: str | None = None, min_samples: int = 1, test: str = "test_small.npz") -> Path:
        """A pipeline.toml in the world's folder."""
        root = self.root
        examples = Path(__file__).resolve().parent.parent / "examples"
        text = f"""
[model]
name = "fashion"
source = "v1.pt"

[registry]
db = "{self.db_url}"
dir = "registry"
trusted_keys = "keys"

[data]
original = "original.npz"
test = "{test}"
samples = [{samples if samples is not None else '"export"'}]
holdout_fraction = 0.3
min_samples = {min_samples}

[train]
entry = "retrain_fashion:train"
path = ["{examples}"]
params = {{ epochs = {epochs}, sample_repeat = 2 }}

[evaluate]
min_gain_pp = {min_gain_pp}
max_loss_pp = 0.5

[sign]
key = "keys/release.key"

[deploy]
enabled = {str(deploy).lower()}
fleet = "{fleet}"
mqtt = "{SYSTEM_BROKER}"
base_url = "http://127.0.0.1:9/"
stages = "5,100"
hold = "10m"
devices = {json.dumps(DEVICES)}

[triggers]
cooldown = "0s"

[pipeline]
workdir = "runs"
{extra}
"""
        path = root / f"{name}.toml"
        path.write_text(text)
        return path

    def registry(self) -> Any:
        from edge_sdk.fleet.db import Database
        from edge_sdk.fleet.lifecycle.registry import Registry

        db = Database.connect(self.db_url)
        return db, Registry(db, self.root / "registry")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, fashion_torch_cnn: Any,
          fashion_test: tuple[np.ndarray, np.ndarray]) -> World:
    return World(tmp_path_factory.mktemp("pipeline"), fashion_torch_cnn, fashion_test)


def clear_retained(fleet: str) -> None:
    from edge_sdk.fleet.lifecycle.commands import MqttCommandPublisher

    with MqttCommandPublisher(SYSTEM_BROKER) as publish:
        for d in DEVICES:
            publish(f"edge/{fleet}/{d}/cmd/update", b"", True)


# ---- the conversion options recorded in the manifest ---------------------------------------------------------------

def test_manifest_records_conversion_options_and_they_replay(world: World) -> None:
    from edge_sdk.bundle import Bundle
    from edge_sdk.pipeline.convert import replay_kwargs
    from edge_sdk.schema import validate_manifest

    m = Bundle.load(world.root / "v1").manifest.to_dict()
    validate_manifest(m)
    conv = m["extra"]["conversion"]
    assert conv["to"] == "onnx" and conv["precision"] == "fp32" and conv["ort"] is False
    assert conv["input_shape"] == [1, 1, 28, 28] and conv["dynamic"] == ["batch"]
    assert conv["model_class"] == "torch_models:FashionCNN"
    assert conv["preprocessing"]["color"] == "GRAY" and conv["validation_labels"] is True
    kw = replay_kwargs(m)
    assert kw["preprocessing"].size == (28, 28) and kw["labels"] == m["labels"] and kw["dynamic"] == ["batch"]
    bad = {**m, "extra": {**m["extra"], "conversion": {**conv, "ort": "yes"}}}
    with pytest.raises(Exception, match="ort"):
        validate_manifest(bad)
    with pytest.raises(PipelineError, match="no recorded conversion"):
        replay_kwargs({**m, "extra": {}})


# ---- a full run: gather, train, convert, evaluate, sign + register, deploy -----------------------------------------

@pytest.mark.slow
def test_pipeline_retrains_beats_v1_on_drift_keeps_original_and_deploys(world: World, capsys: Any) -> None:
    require_system_broker()
    fleet = unique_fleet("pl")
    cfg = load_config(world.config("full", fleet=fleet, test="test.npz"))
    t0 = time.perf_counter()
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/+/cmd/update") as sub:
        try:
            result = run_pipeline(cfg)
            assert result.ok, result.record
            assert wait_until(lambda: len(sub.received()) >= 1, 10)
            got = [json.loads(m.payload) for m in sub.received()]
        finally:
            clear_retained(fleet)
    seconds = time.perf_counter() - t0
    rec = result.record
    assert rec["status"] == "succeeded" and rec["version"] == "2" and rec["error"] is None
    assert [s["step"] for s in rec["steps"]] == ["gather", "train", "convert", "evaluate", "register", "deploy"]
    assert json.loads((result.workdir / "run.json").read_text())["status"] == "succeeded"
    gathered = json.loads((result.workdir / "gather" / "gather.json").read_text())["figures"]
    assert gathered["sample_rows_labelled"] == 3000  # the 200 unlabelled and the hostile row are skipped
    assert gathered["exports"][0]["skipped"] == {"unlabelled": 200, "file missing or outside the folder": 1}
    assert 700 < gathered["drift_holdout_rows"] < 1100 and gathered["test_rows"] == 10000
    assert len(gathered["data_sha256"]) == 64
    ev = json.loads((result.workdir / "evaluate" / "evaluate.json").read_text())["figures"]
    drift, test = ev["drift"], ev["test"]
    with capsys.disabled():
        print(f"\nMEASURED v1 -> v2: drifted holdout {100 * drift['current_accuracy']:.2f}% -> "
              f"{100 * drift['candidate_accuracy']:.2f}% ({drift['delta_pp']:+.2f} pp on {drift['samples']}); original "
              f"test {100 * test['current_accuracy']:.2f}% -> {100 * test['candidate_accuracy']:.2f}% "
              f"({test['delta_pp']:+.2f} pp on {test['samples']}); run {seconds:.1f} s; steps "
              + ", ".join(f"{s['step']} {s['seconds']:.1f}s" for s in rec["steps"]))
    assert ev["accepted"] and drift["delta_pp"] >= 2.0 and test["delta_pp"] >= -0.5
    assert drift["candidate"]["runtime"] == "onnxruntime"
    # the registry: v2 signed and verified, promoted by the registry's gate, lineage of every step with hashes
    db, reg = world.registry()
    with db:
        v2 = reg.show("fashion", "2")
        assert v2.state == "canary" and v2.signature_verified
        p = v2.lineage["pipeline"]
        assert p["run_id"] == rec["run_id"] and set(p["steps"]) == {"gather", "train", "convert", "evaluate",
                                                                     "register", "deploy"}
        assert p["steps"]["gather"]["outputs"]["data"]["sha256"] and p["steps"]["train"]["outputs"]["model"]["sha256"]
        assert p["steps"]["evaluate"]["figures"]["drift"]["delta_pp"] == drift["delta_pp"]
        assert p["steps"]["deploy"]["outputs"]["deployment_id"] == rec["deployment_id"]
        assert Path(p["source_model"]["path"]).is_file()
        assert v2.manifest["extra"]["conversion"]["model_class"] == "torch_models:FashionCNN"
        dep = reg.db.query("SELECT * FROM deployments WHERE id = ?", (rec["deployment_id"],))[0]
        assert dep["stages"] == "5,100" and dep["state"] == "running" and dep["previous_version"] == "1"
    # stage 1 (5 %): at least one device got the retained update for version 2, not all of them
    assert {g["model"]["version"] for g in got} == {"2"} and 1 <= len(got) < len(DEVICES)
    assert got[0]["model"]["sha256"] == v2.bundle_sha256
    # `edge-sdk registry show` prints the lineage
    from edge_sdk.cli import main

    capsys.readouterr()
    assert main(["registry", "show", "fashion:2", "--db", world.db_url, "--registry-dir",
                 str(world.root / "registry")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["lineage"]["pipeline"]["steps"]["evaluate"]["figures"]["accepted"] is True


def test_a_version_that_does_not_beat_the_current_is_refused_and_not_deployed(world: World) -> None:
    require_system_broker()
    fleet = unique_fleet("pr")
    cfg = load_config(world.config("refused", epochs=0, fleet=fleet))  # "v2" = v1 unchanged: no gain
    db, reg = world.registry()
    with db:
        before = [r.version for r in reg.list("fashion")]
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/+/cmd/#") as sub:
        result = run_pipeline(cfg)
        time.sleep(0.5)
        assert sub.received() == []  # nothing was sent to any device
    assert result.status == "refused"
    rec = json.loads((result.workdir / "run.json").read_text())
    print("\nMEASURED refused run steps: " + ", ".join(f"{s['step']} {s['seconds']:.1f}s" for s in rec["steps"]))
    assert rec["status"] == "refused" and rec["failed_step"] == "evaluate"
    assert rec["error"].startswith("evaluate: gate refused: fashion:") and "\n" not in rec["error"]
    assert [s["step"] for s in rec["steps"]] == ["gather", "train", "convert", "evaluate"]
    ev = json.loads((result.workdir / "evaluate" / "evaluate.json").read_text())["figures"]
    assert ev["accepted"] is False and abs(ev["drift"]["delta_pp"]) < 0.5  # both figures recorded
    assert "delta_pp" in ev["test"]
    db, reg = world.registry()
    with db:
        assert [r.version for r in reg.list("fashion")] == before  # not registered
    # too few labelled samples to retrain on: the gather step stops the run, nothing after it runs
    few = write_export(world.root / "few", world.dark[:3], world.dark_labels[:3])
    result = run_pipeline(load_config(world.config("few", samples=f'"{few}"', fleet=fleet, min_samples=100)))
    assert result.status == "failed" and result.record["failed_step"] == "gather"
    assert result.record["error"].startswith("gather: only 3 labelled sample(s)")
    assert [s["step"] for s in result.record["steps"]] == ["gather"]


def test_steps_run_one_by_one_and_a_missing_input_is_one_line(world: World, tmp_path: Path, capsys: Any) -> None:
    from edge_sdk.cli import main

    cfg = world.config("steps", epochs=0, deploy=False)
    wd = tmp_path / "run"
    assert main(["pipeline", "run", str(cfg), "--only", "gather", "--workdir", str(wd)]) == 0
    assert (wd / "gather" / "data.npz").is_file() and (wd / "gather" / "gather.json").is_file()
    capsys.readouterr()
    assert main(["pipeline", "run", str(cfg), "--only", "convert", "--workdir", str(wd)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "run the train step first" in errors[0], errors
    rec = json.loads((wd / "run.json").read_text())
    assert rec["status"] == "failed" and rec["failed_step"] == "convert"
    assert main(["pipeline", "run", str(cfg), "--from", "nope", "--workdir", str(wd)]) == 2
    assert "unknown step 'nope'" in capsys.readouterr().err


def test_one_run_at_a_time_per_model(world: World) -> None:
    from edge_sdk.pipeline.runner import model_lock

    cfg = load_config(world.config("lock", epochs=0, deploy=False))
    with model_lock(cfg, "other-run", world.root / "elsewhere"), pytest.raises(PipelineBusy, match="other-run"):
        run_pipeline(cfg)


# ---- pipeline.toml and export folders: one-line errors ------------------------------------------------------------

@pytest.mark.parametrize(("text", "needle"), [
    ('[model]\nname = "m"\n[data]\noriginal = "a.npz"\ntest = "b.npz"\n[train]\nentry = "x:y"\n[deploy]\n'
     'enabled = false\n[evaluate]\nmin_gain = 1\n', "unknown key [evaluate] min_gain"),
    ('[model]\nname = "m"\n[data]\noriginal = "a.npz"\ntest = "b.npz"\n[train]\nentry = "x:y"\n[deploy]\n'
     'enabled = false\n[evaluate]\nmax_loss_pp = "half"\n', "[evaluate] max_loss_pp must be a number"),
    ('[model]\nname = "m"\n[data]\noriginal = "a.csv"\ntest = "b.npz"\n[train]\nentry = "x:y"\n', "[data] original"),
    ('[model]\nname = "m"\n[data]\noriginal = "a.npz"\ntest = "b.npz"\n[train]\nentry = "nocolon"\n', "[train] entry"),
    ('[model]\nname = "m"\n[data]\noriginal = "a.npz"\ntest = "b.npz"\n[train]\nentry = "x:y"\n',
     "[deploy] fleet is required"),
    ('[model]\nname = "../m"\n[data]\noriginal = "a.npz"\ntest = "b.npz"\n[train]\nentry = "x:y"\n',
     "[model] name"),
    ('[modle]\nname = "m"\n', "unknown section [modle]"),
    ('[model\nname = "m"\n', "not valid TOML"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    with pytest.raises(PipelineConfigError) as exc:
        load_config(p)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_damaged_export_folders_are_refused(world: World, tmp_path: Path) -> None:
    from edge_sdk.pipeline.gather import read_export
    from edge_sdk.preprocessing import Preprocessing

    pre = Preprocessing(size=(28, 28), color="GRAY")
    folder = write_export(tmp_path / "e", world.dark[:5], world.dark_labels[:5])
    ok = read_export(folder, pre, [1, 28, 28], "float32", 10)
    assert ok["labelled"] == 5 and np.allclose(ok["inputs"][0], np.round(world.dark[0] * 255) / 255, atol=1e-6)
    with open(folder / "samples.csv", "a") as fh:  # changed after export: the sha256 in export.json no longer fits
        fh.write("x" * 64 + ",images/x.png,f1,d,fashion,1,0,0.5,1,random,2026-12-06T20:00:00Z\n")
    with pytest.raises(PipelineError, match=r"does not match the sha256 in export\.json"):
        read_export(folder, pre, [1, 28, 28], "float32", 10)
    (folder / "export.json").unlink()
    with pytest.raises(PipelineError, match="not an export folder"):
        read_export(folder, pre, [1, 28, 28], "float32", 10)
    # a row whose file is corrupt, or labelled out of range: counted, not fatal
    bad = write_export(tmp_path / "b", world.dark[:3], np.array([1, 2, 99]))
    first = sorted((bad / "images").iterdir())[0]
    first.write_bytes(b"not a png")
    got = read_export(bad, pre, [1, 28, 28], "float32", 10)
    assert got["labelled"] + sum(got["skipped"].values()) == 3 and "label outside 0..9" in got["skipped"]


# ---- the alert webhook --------------------------------------------------------------------------------------------

def v4(alertname: str, status: str = "firing", fleet: str = "f1", **labels: str) -> dict[str, Any]:
    lab = {"alertname": alertname, "fleet": fleet, "device": "dev03", "severity": "warning", "model": "fashion",
           "model_version": "1", **labels}
    return {"version": "4", "status": status, "receiver": "edge-sdk", "groupKey": "{}:{alertname=" + alertname + "}",
            "groupLabels": {"alertname": alertname, "fleet": fleet}, "commonLabels": lab, "commonAnnotations": {},
            "externalURL": "http://collector:8080", "truncatedAlerts": 0,
            "alerts": [{"status": status, "labels": lab, "annotations": {"summary": "s", "description": "d"},
                        "startsAt": "2026-12-06T20:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
                        "generatorURL": "http://collector:8080/", "fingerprint": uuid.uuid4().hex[:16]}]}


def post(url: str, body: bytes | dict, *, token: str | None = None, method: str = "POST", path: str = "/alerts",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    host, port = url.split("://")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=data if method == "POST" else None, headers=h)
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    return resp.status, json.loads(raw) if raw else {}


def test_webhook_starts_exactly_one_run_and_ignores_resolved_and_other_alerts(world: World) -> None:
    from edge_sdk.pipeline.serve import PipelineServer

    cfg = load_config(world.config("serve", epochs=0, deploy=False, fleet="f1"))
    runs = world.root / "runs" / "fashion"
    before = {p.name for p in runs.iterdir()} if runs.exists() else set()
    with PipelineServer(cfg, port=0, on=("drift", "confidence_drop", "accuracy_drop")) as srv:
        assert post(srv.url, v4("drift", "resolved"))[1]["action"] == "ignored"
        assert post(srv.url, v4("latency_sla"))[1]["action"] == "ignored"
        assert post(srv.url, v4("drift", fleet="other"))[1]["action"] == "ignored"
        assert post(srv.url, v4("drift", model="another_model"))[1]["action"] == "ignored"
        status, first = post(srv.url, v4("drift"))
        assert status == 202 and first["action"] == "started"
        # while it runs: a second alert (v4, and the collector's pre-v4 body) is recorded, not queued
        assert post(srv.url, v4("confidence_drop"))[1]["action"] == "coalesced"
        old = {"event": "alert.opened", "alert": {"id": 7, "fleet": "f1", "device": "dev04", "rule": "drift",
                                                  "severity": "warning", "state": "open", "value": 0.4,
                                                  "threshold": 0.25, "message": "m", "model_version": "1",
                                                  "at": 1.0}}
        assert post(srv.url, old)[1]["action"] == "coalesced"
        assert srv.wait_idle(180)
        status, st = post(srv.url, b"", method="GET", path="/status")
        assert status == 200 and st["counts"] == {"ignored": 4, "started": 1, "coalesced": 2}
        assert [r["run_id"] for r in st["runs"]] == [first["run_id"]]
        assert st["runs"][0]["status"] == "refused"  # epochs=0: the unchanged model does not beat v1
    new = {p.name for p in runs.iterdir() if p.is_dir()} - before
    assert new == {first["run_id"]}
    rec = json.loads((runs / first["run_id"] / "run.json").read_text())
    assert rec["trigger"]["kind"] == "alert" and rec["trigger"]["alertname"] == "drift"
    assert rec["trigger"]["format"] == "alertmanager-v4"
    log = [json.loads(line) for line in (runs / "serve.jsonl").read_text().splitlines()]
    assert [e["action"] for e in log[-7:]] == ["ignored"] * 4 + ["started", "coalesced", "coalesced"]


@pytest.mark.parametrize(("body", "status", "needle"), [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'{"hello": 1}', 400, "neither an Alertmanager"),
    (b'{"version": "3", "alerts": []}', 400, "version"),
    (b'{"version": "4", "alerts": "drift"}', 400, "alerts must be a list"),
    (json.dumps({"version": "4", "alerts": [{}] * 1001}).encode(), 400, "at most 1000"),
    (b'{"version": "4", "alerts": [{"status": "firing", "labels": {"alertname": 5}}]}', 400, "string"),
    (b'{"version": "4", "alerts": [{"status": "firing", "labels": {"fleet": "f1"}}]}', 400, "alertname"),
    (b'{"version": "4", "alerts": [{"status": "burning", "labels": {"alertname": "drift"}}]}', 400, "firing"),
    (b'{"event": "alert.exploded", "alert": {"rule": "drift"}}', 400, "alert.opened"),
    (b'{"version": "4", "alerts": [{"status": "firing", "labels": {"alertname": "' + b"x" * 600 + b'"}}]}', 400,
     "at most"),
    (b"x" * (300 * 1024), 413, "limit"),
])
def test_hostile_webhook_bodies_get_4xx(world: World, tmp_path: Path, body: bytes, status: int, needle: str) -> None:
    from edge_sdk.pipeline.serve import PipelineServer

    cfg = load_config(world.config("hostile", epochs=0, deploy=False))
    with PipelineServer(cfg, port=0) as srv:
        got, answer = post(srv.url, body)
        assert got == status and needle in answer["error"], answer
        assert "\n" not in answer["error"]
        assert srv.status()["running"] is None and srv.status()["counts"] == {}


def test_webhook_token_and_methods(world: World, tmp_path: Path) -> None:
    from edge_sdk.httpbase import HTTPSecurity
    from edge_sdk.pipeline.serve import PipelineServer

    token = "t0ken-" + uuid.uuid4().hex
    (tmp_path / "token").write_text(token + "\n")
    cfg = load_config(world.config("token", epochs=0, deploy=False))
    sec = HTTPSecurity.load(token_file=tmp_path / "token")
    with PipelineServer(cfg, port=0, security=sec) as srv:
        assert post(srv.url, v4("latency_sla"))[0] == 401
        assert post(srv.url, v4("latency_sla"), token="wrong" * 5)[0] == 401
        code, ans = post(srv.url, v4("latency_sla"), token=token)
        assert code == 200 and ans["action"] == "ignored"
        assert post(srv.url, b"", method="GET", path="/healthz")[0] == 200  # public
        assert post(srv.url, b"", method="GET", path="/status")[0] == 401
        assert post(srv.url, b"", method="GET", path="/alerts", token=token)[0] == 405
        # no Content-Length: refused before reading
        host, port = srv.url.split("://")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.putrequest("POST", "/alerts")
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        assert conn.getresponse().status == 411
        conn.close()
    # a non-loopback address without a token is refused at start
    from edge_sdk.errors import ConfigError

    with pytest.raises(ConfigError, match="without authentication"):
        PipelineServer(cfg, host="0.0.0.0", port=0)


def test_parse_alerts_reads_both_webhook_formats() -> None:
    from edge_sdk.pipeline.serve import parse_alerts

    body = v4("drift")
    body["alerts"].append({**body["alerts"][0], "status": "resolved",
                           "labels": {**body["alerts"][0]["labels"], "device": "dev05"}})
    fmt, alerts = parse_alerts(json.dumps(body).encode())
    assert fmt == "alertmanager-v4" and [(a.alertname, a.firing, a.device) for a in alerts] == [
        ("drift", True, "dev03"), ("drift", False, "dev05")]
    assert alerts[0].fleet == "f1" and alerts[0].model == "fashion"
    for event, state, firing in (("alert.opened", "open", True), ("alert.resolved", "resolved", False)):
        fmt, [a] = parse_alerts(json.dumps({"event": event, "alert": {"rule": "confidence_drop", "fleet": "f1",
                                                                      "device": "d", "state": state}}).encode())
        assert fmt == "edge-sdk-v1" and a.alertname == "confidence_drop" and a.firing is firing and a.model is None
