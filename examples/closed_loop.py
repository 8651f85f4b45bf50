"""The whole MLOps loop on this machine, with real parts: drift on the devices -> alert -> retrain -> gate -> rollout.

    python examples/closed_loop.py [--devices 10] [--out closed_loop_out] [--hold 12]

1. v1: the cached Fashion-MNIST CNN (examples/train.py), converted to ONNX with its preprocessing recorded (so the
   pipeline can replay the conversion), signed with a release key, registered and made active.
2. The collector (SQLite, the machine's Mosquitto, a unique fleet name, alert rules every second with 1 s
   notification grouping: the ``alerts.toml`` it writes; rollouts judged every 2 s) with its HTTP server: bundle
   downloads (/bundles/) and device sample uploads (/api/samples) into a sample store. Its alert webhook points at
   `edge-sdk pipeline serve` (here: :class:`edge_sdk.pipeline.serve.PipelineServer` in this process).
3. N real device agents (edge_sdk.testing.agent_fleet: the shipped DeviceRunner wiring, in 2 processes) on v1 with
   ``[capture]`` on. Daylight first, with the collector's HTTP server down: the devices capture 50 % of their
   predictions into a small on-device store (32 KiB), the oldest dropped and counted, nothing uploaded. Then the
   collector comes back and night falls: the devices restart (their capture stores survive), upload what they kept,
   and see the same kind of scene at 40 % brightness; capture takes drifting windows, low-confidence predictions and
   feedback disagreements, and every 2nd prediction gets its true label through the agent's feedback.
4. The drift alert opens; the collector POSTs it (Alertmanager v4); the pipeline waits for 300 labelled samples
   (``[data] wait_for_samples``), fine-tunes v1 (examples/retrain_fashion.py), replays the conversion (validation
   and drift baseline on the device samples: the data the fleet sees now), gates v2 (must beat v1 on the drifted
   holdout by 2 pp and lose <= 0.5 pp on the original test set), signs and registers it and starts the rollout
   5 % -> 100 %; the collector advances it from the devices' telemetry. On v2 the drift / confidence alerts resolve.

Prints every figure (and writes them to ``OUT/figures.json``): the outage (captured, kept, dropped, the cap, lost),
the drift alert time, the samples (count, bytes, labels, device cap), the gate (both holdouts), the whole test set
darkened (an unbiased check: the drifted holdout is made of captured samples, biased towards hard ones), the
rollout stages, the time from the alert to 100 % and the alerts resolved. Exit 0 when the loop closed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

N_ORIGINAL = 20000


def _v1(out: Path, keys: Path) -> Path:
    """The v1 bundle: cached CNN -> ONNX (dynamic batch, GRAY preprocessing recorded) -> signed."""
    import torch
    from data import FASHION_CLASSES, fashion_tensors
    from train import cached_model

    import edge_sdk
    from edge_sdk.preprocessing import Preprocessing
    from edge_sdk.signing import sign_bundle

    torch.save(cached_model("torch").state_dict(), out / "v1.pt")
    xte, yte = fashion_tensors("test", "NCHW")
    edge_sdk.convert(out / "v1.pt", model_class="torch_models:FashionCNN", input_shape=[1, 1, 28, 28],
                     dynamic="batch", to="onnx", precision="fp32", ort=False, out=out / "v1", overwrite=True,
                     preprocessing=Preprocessing(size=(28, 28), color="GRAY", layout="NCHW"),
                     labels=list(FASHION_CLASSES), name="fashion", version="1", version_code=1, quiet=True,
                     val=xte[:300], val_labels=yte[:300])
    sign_bundle(out / "v1", keys / "release.key")
    return out / "v1"


def _pipeline_toml(out: Path, db_url: str, fleet: str, base_url: str, hold_s: float, min_samples: int,
                   baseline: str = "samples") -> Path:
    text = f"""
[model]
name = "fashion"
source = "{out / 'v1.pt'}"

[registry]
db = "{db_url}"
dir = "{out / 'registry'}"
trusted_keys = "{out / 'keys'}"

[data]
original = "{out / 'original.npz'}"
test = "{out / 'test.npz'}"
export_fleet = "{fleet}"
min_samples = {min_samples}
wait_for_samples = "3m"
holdout_fraction = 0.3

[train]
entry = "retrain_fashion:train"
path = ["{HERE}"]
params = {{ epochs = 1, sample_repeat = 4, lr = 3e-4 }}

[convert]
baseline = "{baseline}"

[evaluate]
min_gain_pp = 2.0
max_loss_pp = 0.5

[sign]
key = "{out / 'keys' / 'release.key'}"

[deploy]
fleet = "{fleet}"
mqtt = "mqtt://127.0.0.1:1883"
base_url = "{base_url}"
stages = "5,100"
hold = "{hold_s}s"
rollback_key = "{out / 'keys' / 'release.key'}"
# a canary p95 is judged over ~60 inferences here: one scheduling stall of this shared 2-core host (28 ms seen)
# would roll a healthy v2 back on latency; error rate, confidence and input PSI are judged as shipped
thresholds = {{ min_p95_slack_ms = 25.0 }}

[triggers]
on = ["drift", "confidence_drop", "accuracy_drop"]
cooldown = "10m"

[pipeline]
workdir = "{out / 'runs'}"
"""
    path = out / "pipeline.toml"
    path.write_text(text)
    return path


def _rules(out: Path) -> Path:
    """Alert rules for a demo that takes minutes: rules every second, notifications after 1 s (defaults: 5 s, 30 s)."""
    path = out / "alerts.toml"
    path.write_text("interval_s = 1.0\n\n[notify]\ngroup_wait_s = 1.0\ngroup_interval_s = 5.0\n"
                    "repeat_interval_s = 0.0\n")
    return path


def _device_shas(store_root: Path, devices: list[str]) -> dict[str, set[str]]:
    """device -> sha256 of the samples waiting in its capture store (read from its index once it stopped)."""
    import sqlite3

    out: dict[str, set[str]] = {}
    for d in devices:
        db = store_root / d / "capture" / "index.db"
        if not db.exists():
            out[d] = set()
            continue
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            out[d] = {r[0] for r in conn.execute("SELECT sha256 FROM samples")}
        finally:
            conn.close()
    return out


def _blob_bytes(store_root: Path, devices: list[str]) -> dict[str, int]:
    """device -> bytes of the sample files on its disk now (the cap is checked on the files, not on a counter)."""
    out = {}
    for d in devices:
        blobs = store_root / d / "capture" / "blobs"
        total = 0
        if blobs.is_dir():
            for f in blobs.iterdir():
                try:
                    total += f.stat().st_size
                except FileNotFoundError:  # uploaded and removed meanwhile
                    pass
        out[d] = total
    return out


def _wait(cond: Any, timeout_s: float, every_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v or time.monotonic() >= deadline:
            return v
        time.sleep(every_s)


def run(devices: int, out: Path, hold_s: float, timeout_s: float, *, outage_s: float = 20.0,
        outage_cap: int = 32 * 1024, night_cap: int = 8 << 20, min_samples: int = 300, rate_hz: float = 5.0,
        resolve_timeout_s: float = 90.0, baseline: str = "samples", say: Any = print) -> dict[str, Any]:
    """The loop (module doc); returns every figure, ``figures["ok"]`` True when v2 reached 100 % of the fleet, the
    drift and confidence alerts resolved and no sample was lost during the collector outage."""
    from data import fashion_tensors

    from edge_sdk.fleet.collector.service import Collector
    from edge_sdk.fleet.dashboard.server import CollectorHTTP
    from edge_sdk.fleet.db import Database
    from edge_sdk.fleet.lifecycle.gate import evaluate_archive
    from edge_sdk.fleet.lifecycle.registry import Registry
    from edge_sdk.pipeline import load_config
    from edge_sdk.pipeline.serve import PipelineServer
    from edge_sdk.signing import generate_keypair
    from edge_sdk.testing.agent_fleet import AgentFleet

    try:
        from edge_sdk.fleet.samples.store import SampleStore
    except ImportError:
        say("missing: edge_sdk.fleet.samples (the collector's sample store, issue 18 item 2)")
        return {"ok": False, "error": "missing edge_sdk.fleet.samples"}
    if "capture" not in inspect.signature(AgentFleet).parameters:
        say("missing: AgentFleet(capture=...) — simulated devices with [capture] on (issue 18 item 1)")
        return {"ok": False, "error": "missing AgentFleet(capture=...)"}

    t_begin = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    fleet = f"loop{uuid.uuid4().hex[:6]}"
    fig: dict[str, Any] = {"fleet": fleet, "devices": devices, "ok": False}
    keys = out / "keys"
    if not (keys / "release.key").exists():
        generate_keypair(keys, "release")
    xtr, ytr = fashion_tensors("train", "NCHW")
    xte, yte = fashion_tensors("test", "NCHW")
    np.savez(out / "original.npz", inputs=xtr[:N_ORIGINAL], labels=ytr[:N_ORIGINAL])
    np.savez(out / "test.npz", inputs=xte, labels=yte)
    bundle = _v1(out, keys)
    db_url = f"sqlite:///{(out / 'fleet.db').resolve()}"
    db = Database.connect(db_url)
    db.migrate()
    reg = Registry(db, out / "registry", trusted_keys=str(keys))
    if reg.get("fashion", "1") is None:
        reg.add(bundle)
    reg.activate("fashion", "1", "closed_loop.py: v1 runs in the fleet")
    archive_v1 = reg.show("fashion", "1").archive_path

    samples = SampleStore(db, out / "samples")
    http = CollectorHTTP(db, "127.0.0.1", 0, samples=samples)  # bound now: its URL is what the devices get
    port, base_url = http.port, http.url
    cfg = load_config(_pipeline_toml(out, db_url, fleet, base_url, hold_s, min_samples, baseline))
    server = PipelineServer(cfg, port=0).start()
    m = reg.show("fashion", "1").manifest
    collector = Collector(db_url, "mqtt://127.0.0.1:1883", fleet=fleet, client_id=f"loop-collector-{fleet}",
                          rules=_rules(out), webhook=f"{server.url}/alerts", rollout_interval_s=2.0,
                          baselines={("fashion", "1"): m["baseline"]})
    collector.start(wait_s=15)
    store_root = out / "devices"
    day = np.round(xte[:2000, 0] * 255).astype(np.uint8)
    night = np.round(xtr[50000:56000, 0] * 0.4 * 255).astype(np.uint8)
    common = {"processes": 2, "fleet": fleet, "mqtt_url": "mqtt://127.0.0.1:1883", "store_root": store_root,
              "initial_bundle": archive_v1, "trusted_keys": str(keys), "window_s": 1.0, "rate_hz": rate_hz}
    names: list[str] = []
    agents = None
    try:
        # ---- 1. daylight, the collector's HTTP server down: devices keep samples under their cap -----------------
        http.shutdown()  # bound, never served: uploads are refused like a collector that is down
        say(f"fleet {fleet}: {devices} devices on fashion:1 (mqtt://127.0.0.1:1883), collector {base_url} DOWN, "
            f"pipeline webhook {server.url}")
        outage = {"sample_rate": 0.5, "max_bytes": outage_cap, "upload_url": base_url, "upload_interval_s": 1}
        peak_disk = 0
        with AgentFleet(devices, inputs=day, labels=yte[:2000], capture=outage, **common) as a0:
            names = list(a0.devices)
            t_end = time.monotonic() + outage_s
            while time.monotonic() < t_end:
                time.sleep(1.0)
                peak_disk = max(peak_disk, *_blob_bytes(store_root, names).values())
        reps0 = a0.final_reports or {}
        caps0 = [r["capture"] for r in reps0.values() if r.get("capture")]
        kept = _device_shas(store_root, names)
        o = {"seconds": outage_s, "cap_bytes": outage_cap,
             "captured": sum(c["captured"]["random"] for c in caps0),
             "stored": sum(c["stored"] for c in caps0), "dropped": sum(c["dropped"] for c in caps0),
             "stored_bytes_max": max((c["stored_bytes"] for c in caps0), default=0), "disk_bytes_max": peak_disk,
             "upload_failures": sum(c["upload_failures"] for c in caps0),
             "uploaded": sum(c["uploaded"] + c["upload_duplicates"] for c in caps0),
             "kept_distinct": len(set().union(*kept.values())) if kept else 0}
        o["accounted"] = all(c["captured"]["random"] == c["stored"] + c["dropped"] for c in caps0) and \
            len(caps0) == devices
        o["cap_held"] = o["stored_bytes_max"] <= outage_cap and peak_disk <= outage_cap
        fig["outage"] = o
        say(f"collector down {outage_s:.0f} s: {o['captured']} samples captured, {o['stored']} kept on the devices "
            f"(largest store {o['stored_bytes_max']} B on disk {peak_disk} B, cap {outage_cap} B), {o['dropped']} "
            f"oldest dropped by the cap and counted, {o['upload_failures']} failed upload rounds, "
            f"{o['uploaded']} uploaded")

        # ---- 2. the collector is back; night falls ------------------------------------------------------------
        http = CollectorHTTP(db, "127.0.0.1", port, samples=samples)
        http.start()
        night_capture = {"drift": True, "feedback_disagree": True, "low_confidence": 0.5, "sample_rate": 0.02,
                         "upload_url": base_url, "upload_interval_s": 1, "max_bytes": night_cap}
        say("collector back; night falls: the same devices now see images at 40 % brightness, every 2nd prediction "
            "gets its true label through the agent's feedback")
        t_night_wall = time.time()
        agents = AgentFleet(devices, inputs=night, labels=ytr[50000:56000], feedback_every=2,
                            capture=night_capture, **common).start()
        t_night = time.monotonic()
        wanted = set().union(*kept.values()) if kept else set()

        def delivered() -> int:
            if not wanted:
                return 0
            rows = db.query("SELECT sha256 FROM samples WHERE fleet=?", (fleet,))
            return len(wanted & {r["sha256"] for r in rows})

        _wait(lambda: delivered() == len(wanted), 60.0)
        o["resumed_after_s"] = round(time.monotonic() - t_night, 1)
        o["delivered"] = delivered()
        o["lost"] = len(wanted) - o["delivered"]
        say(f"uploads resumed: {o['delivered']}/{len(wanted)} samples kept during the outage reached the collector "
            f"within {o['resumed_after_s']} s of the devices' restart ({o['lost']} lost)")

        # ---- 3. drift alert -> pipeline run -> v2 -> rollout ----------------------------------------------------
        deadline = time.monotonic() + timeout_s
        t_alert_wall = t_started_wall = None
        peak_store, disk_peak = 0, 0
        dep = None
        while time.monotonic() < deadline:
            time.sleep(2)
            reps = agents.reports()
            peak_store = max([peak_store] + [r["capture"]["stored_bytes"] for r in reps.values() if r.get("capture")])
            disk_peak = max(disk_peak, *_blob_bytes(store_root, names).values())
            if t_alert_wall is None:
                row = db.query("SELECT MIN(opened_at) AS t FROM alerts WHERE fleet=? AND rule='drift' AND "
                               "opened_at >= ?", (fleet, t_night_wall))
                if row and row[0]["t"] is not None:
                    t_alert_wall = float(row[0]["t"])
                    fig["drift_alert_s"] = round(t_alert_wall - t_night_wall, 1)
                    say(f"drift alert opened {fig['drift_alert_s']} s after night fell")
            st = server.status()
            if t_started_wall is None:
                started = [e for e in st["recent"] if e.get("action") == "started"]
                if started:
                    t_started_wall = float(started[0]["at"])
                    say(f"alert webhook -> pipeline run {started[0]['run_id']} started"
                        + (f" {t_started_wall - t_alert_wall:.1f} s after the alert opened" if t_alert_wall else ""))
            bad = [r for r in st["runs"] if r["status"] != "succeeded"]
            if bad:
                fig["error"] = f"pipeline run {bad[0]['run_id']} {bad[0]['status']}: {bad[0]['error']}"
                say(fig["error"])
                break
            deps = db.query("SELECT * FROM deployments WHERE fleet=? AND name='fashion' ORDER BY created_at DESC "
                            "LIMIT 1", (fleet,))
            dep = deps[0] if deps else None
            if dep is not None and dep["state"] != "running":
                break
        fig["device_store_peak_bytes"], fig["device_disk_peak_bytes"] = peak_store, disk_peak
        # ---- figures: samples, gate, rollout ---------------------------------------------------------------------
        rows = db.query("SELECT policy, COUNT(*) AS n, SUM(size_bytes) AS b, SUM(CASE WHEN label IS NULL THEN 0 "
                        "ELSE 1 END) AS l FROM samples WHERE fleet=? AND captured_at >= ? GROUP BY policy",
                        (fleet, t_night_wall))
        s = {"count": sum(int(r["n"]) for r in rows), "bytes": sum(int(r["b"] or 0) for r in rows),
             "labelled": sum(int(r["l"]) for r in rows),
             "by_policy": {r["policy"]: {"count": int(r["n"]), "labelled": int(r["l"])} for r in rows},
             "cap_bytes": night_cap, "device_store_peak_bytes": peak_store, "device_disk_peak_bytes": disk_peak}
        s["cap_held"] = peak_store <= night_cap and disk_peak <= night_cap
        fig["samples"] = s
        say(f"samples back from the night (at the end of the run): {s['count']} ({s['bytes']} B), {s['labelled']} "
            f"labelled through feedback; by policy {json.dumps(s['by_policy'])}; largest device store "
            f"{peak_store} B (on disk {disk_peak} B) under the {night_cap} B cap")
        runs = server.status()["runs"]
        if runs:
            wd = Path(runs[0]["workdir"])
            ev_path = wd / "evaluate" / "evaluate.json"
            if ev_path.exists():
                ev = json.loads(ev_path.read_text())["figures"]
                fig["gate"] = {k: {x: ev[k][x] for x in ("samples", "current_accuracy", "candidate_accuracy",
                                                         "delta_pp", "limit", "passed")} for k in ("drift", "test")}
                fig["gate"]["accepted"] = ev["accepted"]
                say(f"gate: {ev['reason']}")
            conv = wd / "convert" / "convert.json"
            if conv.exists():
                fig["v2_baseline_from"] = json.loads(conv.read_text())["inputs"].get("validation_from")
                say(f"v2's validation inputs and drift baseline: {fig['v2_baseline_from']}")
            run_rec = wd / "run.json"
            if run_rec.exists():
                rr = json.loads(run_rec.read_text())
                fig["pipeline_steps_s"] = {st["step"]: st.get("seconds") for st in rr.get("steps") or []
                                           if isinstance(st, dict)}
                say("pipeline steps (s): " + ", ".join(f"{k} {v}" for k, v in fig["pipeline_steps_s"].items()))
        if dep is not None:
            dec = db.query("SELECT ts, stage_index, decision, reason FROM rollout_decisions WHERE deployment_id=? "
                           "ORDER BY ts", (dep["id"],))
            fig["rollout"] = {"version": dep["version"], "stages": dep["stages"], "hold_s": dep["hold_s"],
                              "state": dep["state"],
                              "decisions": [{"decision": d["decision"], "stage": d["stage_index"],
                                             "at_s": round(float(d["ts"]) - float(dep["created_at"]), 1)}
                                            for d in dec if d["decision"] != "hold"]}
            say(f"rollout of fashion:{dep['version']} in stages {dep['stages']} (hold {dep['hold_s']:g} s): "
                + ", ".join(f"{d['decision']} stage {d['stage']} at +{d['at_s']} s"
                            for d in fig["rollout"]["decisions"]) + f" -> {dep['state']}")
            if dep["state"] == "completed" and t_alert_wall is not None:
                fig["alert_to_100_s"] = round(float(dep["finished_at"]) - t_alert_wall, 1)
                say(f"time from the drift alert to v2 on 100 % of the fleet: {fig['alert_to_100_s']} s")
            v2 = reg.get("fashion", dep["version"])
            if v2 is not None:  # an unbiased check beside the gate: the whole test set, darkened like the night
                dark = (np.round(xte * 0.4 * 255) / 255).astype(np.float32)
                r1, r2 = evaluate_archive(archive_v1, (dark, yte)), evaluate_archive(v2.archive_path, (dark, yte))
                fig["darkened_test"] = {"samples": len(yte), "v1": r1["accuracy"], "v2": r2["accuracy"],
                                        "delta_pp": round(100 * (r2["accuracy"] - r1["accuracy"]), 2)}
                say(f"whole test set at 40 % brightness ({len(yte)} images, never captured): v1 "
                    f"{100 * r1['accuracy']:.2f} % -> v2 {100 * r2['accuracy']:.2f} % "
                    f"({fig['darkened_test']['delta_pp']:+.2f} pp)")
        # ---- 4. on v2 the drift / confidence alerts resolve -----------------------------------------------------
        if dep is not None and dep["state"] == "completed":
            t_done = float(dep["finished_at"])

            def still_open() -> list[dict[str, Any]]:
                return db.query("SELECT rule, device FROM alerts WHERE fleet=? AND state='open' AND rule IN "
                                "('drift', 'confidence_drop')", (fleet,))

            left = _wait(lambda: not still_open(), resolve_timeout_s)
            opened = db.query("SELECT rule, COUNT(*) AS n, SUM(CASE WHEN state='resolved' THEN 1 ELSE 0 END) AS r, "
                              "MAX(resolved_at) AS last FROM alerts WHERE fleet=? AND rule IN ('drift', "
                              "'confidence_drop') GROUP BY rule", (fleet,))
            on_v2 = sum(1 for r in agents.reports().values() if r.get("current_version") == dep["version"])
            fig["alerts"] = {r["rule"]: {"opened": int(r["n"]), "resolved": int(r["r"]),
                                         "last_resolved_after_100_s": round(float(r["last"]) - t_done, 1)
                                         if r["last"] is not None else None} for r in opened}
            fig["alerts_resolved"] = bool(left) and bool(opened)
            fig["devices_on_v2"] = on_v2
            say(f"{on_v2}/{devices} devices run fashion:{dep['version']}; alerts "
                + "; ".join(f"{k}: {v['opened']} opened, {v['resolved']} resolved (last "
                            f"{v['last_resolved_after_100_s']} s after 100 %)" for k, v in fig["alerts"].items())
                + ("" if fig["alerts_resolved"] else f"; still open after {resolve_timeout_s:.0f} s: "
                   f"{len(still_open())}"))
        fig["ok"] = bool(dep is not None and dep["state"] == "completed" and fig.get("alerts_resolved")
                         and fig["outage"].get("lost") == 0 and fig["outage"]["cap_held"] and s["cap_held"])
        fig["total_s"] = round(time.monotonic() - t_begin, 1)
        say(f"whole story: {fig['total_s']} s; {'OK' if fig['ok'] else 'NOT OK'}")
        (out / "figures.json").write_text(json.dumps(fig, indent=1, default=str))
        return fig
    finally:
        if agents is not None:
            agents.stop()
        collector.stop()
        server.stop()
        server.wait_idle(600)
        http.shutdown()
        db.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("closed_loop_out"))
    p.add_argument("--hold", type=float, default=12.0, help="seconds per rollout stage (12)")
    p.add_argument("--outage", type=float, default=20.0, help="seconds the collector's HTTP server is down (20)")
    p.add_argument("--min-samples", type=int, default=300, help="labelled samples the pipeline waits for (300)")
    p.add_argument("--baseline", choices=("samples", "holdouts"), default="samples",
                   help="v2's validation / drift baseline data ([convert] baseline): samples (default) or holdouts")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds of drift (900)")
    args = p.parse_args(argv)
    fig = run(args.devices, args.out.resolve(), args.hold, args.timeout, outage_s=args.outage,
              min_samples=args.min_samples, baseline=args.baseline)
    return 0 if fig.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
