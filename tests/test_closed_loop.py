"""Issue 18 end to end: examples/closed_loop.py with real parts — the machine's Mosquitto, a real collector (HTTP,
sample store, alert webhook), 10 real device agents with data capture, Fashion-MNIST, the retraining pipeline
triggered by the drift alert, the gate and the staged rollout — plus the hostile-input checks of the pieces added
for it (AgentFleet(capture=...), [convert] baseline, [data] wait_for_samples, [deploy] thresholds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mqtt_helpers import require_system_broker

from edge_sdk.errors import AgentFleetError
from edge_sdk.pipeline.errors import PipelineConfigError
from edge_sdk.testing.agent_fleet import AgentFleet, capture_settings


def _fleet(tmp_path: Path, capture: object) -> AgentFleet:
    return AgentFleet(1, fleet="tcap", mqtt_url="mqtt://127.0.0.1:1883", store_root=tmp_path,
                      initial_bundle=tmp_path / "missing.tar.gz", trusted_keys=tmp_path,
                      inputs=np.zeros((2, 28, 28), np.uint8), capture=capture)  # type: ignore[arg-type]


@pytest.mark.parametrize("capture, message", [
    ({"sample_rate": 0.1, "bogus": 1}, "unknown [capture] key(s) bogus"),
    ({"sample_rate": 2.0}, "sample_rate must be a number between 0 and 1"),
    ({"enabled": True}, "no policy is on"),
    (["sample_rate"], "must be a [capture] table"),
])
def test_agent_fleet_refuses_a_bad_capture_table_in_one_line(tmp_path: Path, capture: object, message: str) -> None:
    with pytest.raises(AgentFleetError) as info:
        _fleet(tmp_path, capture)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_capture_settings_give_each_device_its_own_store(tmp_path: Path) -> None:
    s = capture_settings({"drift": True, "dir": "/elsewhere", "max_bytes": 4096}, tmp_path / "dev000" / "capture")
    assert s.enabled and s.dir == str(tmp_path / "dev000" / "capture") and s.max_bytes == 4096
    assert s.policies() == ["drift"] and capture_settings(None, tmp_path) is None


def test_pipeline_config_checks_the_new_keys(tmp_path: Path) -> None:
    from edge_sdk.pipeline import load_config

    base = '[model]\nname = "m"\n[data]\noriginal = "a.npz"\ntest = "b.npz"\n[train]\nentry = "x:y"\n' \
           '[deploy]\nenabled = false\n'
    ok = tmp_path / "ok.toml"
    ok.write_text(base.replace("[train]", 'wait_for_samples = "2m"\n[train]') + '[convert]\nbaseline = "holdouts"\n')
    cfg = load_config(ok)
    assert cfg.data.wait_for_samples_s == 120.0 and cfg.convert.baseline == "holdouts"
    assert load_config(_write(tmp_path / "d.toml", base)).convert.baseline == "samples"
    bad = _write(tmp_path / "bad.toml", base + '[convert]\nbaseline = "yesterday"\n')
    with pytest.raises(PipelineConfigError, match=r"\[convert\] baseline must be"):
        load_config(bad)
    ok2 = _write(tmp_path / "t.toml", base.replace("enabled = false", 'enabled = false\nthresholds = '
                                                   '{ min_p95_slack_ms = 25.0, min_count = 20 }'))
    assert load_config(ok2).deploy.thresholds == {"min_p95_slack_ms": 25.0, "min_count": 20}
    bad2 = _write(tmp_path / "t2.toml", base.replace("enabled = false", 'enabled = false\nthresholds = '
                                                     '{ p95 = "fast" }'))
    with pytest.raises(PipelineConfigError, match=r"\[deploy\] thresholds must be a table of numbers"):
        load_config(bad2)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.slow
@pytest.mark.soak  # ~4 min: `make test-soak` / .ci/run when its time budget allows
def test_closed_loop_end_to_end(tmp_path: Path) -> None:
    """10 agents: outage, drift alert, samples, pipeline by webhook, gate, 5% -> 100%, alerts resolved (~4 min)."""
    require_system_broker()
    from closed_loop import run

    fig = run(10, tmp_path / "loop", hold_s=10.0, timeout_s=600.0, outage_s=15.0, min_samples=250,
              resolve_timeout_s=90.0, say=print)
    assert fig.get("error") is None, fig.get("error")
    # the collector down: every capture accounted for (kept or dropped by the cap), the cap held, nothing lost
    o = fig["outage"]
    assert o["uploaded"] == 0 and o["upload_failures"] > 0 and o["dropped"] > 0 and o["accounted"]
    assert o["stored_bytes_max"] <= o["cap_bytes"] and o["disk_bytes_max"] <= o["cap_bytes"]
    assert o["kept_distinct"] > 0 and o["lost"] == 0 and o["delivered"] == o["kept_distinct"]
    # drift -> alert -> samples (some labelled through feedback) under the device cap
    assert 0 < fig["drift_alert_s"] < 60
    s = fig["samples"]
    assert s["count"] > s["labelled"] >= 250 and s["bytes"] > 0 and s["cap_held"]
    assert s["by_policy"]["feedback_disagree"]["count"] > 0 and s["by_policy"]["drift"]["count"] > 0
    # the gate: v2 beats v1 on the drifted holdout, loses <= 0.5 pp on the original test set; unbiased check too
    g = fig["gate"]
    assert g["accepted"] and g["drift"]["delta_pp"] >= 2.0 and g["test"]["delta_pp"] >= -0.5
    assert g["test"]["samples"] == 10000 and g["drift"]["samples"] > 0
    assert fig["darkened_test"]["delta_pp"] > 2.0
    assert fig["v2_baseline_from"].startswith("device samples")
    # rollout 5 % -> 100 %, then the drift alerts resolve on v2
    r = fig["rollout"]
    assert r["state"] == "completed" and r["stages"] == "5,100"
    assert [d["decision"] for d in r["decisions"]] == ["start", "advance", "complete"]
    assert fig["devices_on_v2"] == 10 and fig["alert_to_100_s"] > 0
    assert fig["alerts"]["drift"]["opened"] > 0 and fig["alerts_resolved"]
    assert fig["ok"]
