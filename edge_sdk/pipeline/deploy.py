"""Step *deploy*: the staged rollout of the registered version (:class:`edge_sdk.fleet.lifecycle.rollout.Rollout`).

Starts a deployment to ``[deploy] fleet`` in ``[deploy] stages`` (default 5% then 100%) exactly as
``edge-sdk deploy`` does: the first stage's devices get a retained ``cmd/update`` now; the collector (or, with
``follow = true``, this step) judges each stage from the fleet's telemetry after ``hold`` and advances, completes
or rolls back. ``enabled = false`` skips the step (register only).
"""

from __future__ import annotations

import time
from typing import Any

from edge_sdk.pipeline.context import StepContext
from edge_sdk.pipeline.errors import PipelineError
from edge_sdk.pipeline.register import lineage_of

__all__ = ["run"]


def run(ctx: StepContext) -> dict[str, Any]:
    """Run the deploy step (module doc); return its record."""
    from edge_sdk.fleet.lifecycle.canary import Thresholds
    from edge_sdk.fleet.lifecycle.commands import MqttCommandPublisher
    from edge_sdk.fleet.lifecycle.rollout import Rollout

    started, t0 = time.time(), time.perf_counter()
    cfg, d = ctx.config, ctx.config.deploy
    registered = ctx.record("register")
    name, _, version = registered["outputs"]["model"].partition(":")
    if not d.enabled:
        return ctx.write_record("deploy", started, t0=t0, inputs={"model": registered["outputs"]["model"]},
                                outputs={"deployment_id": None}, figures={"skipped": "[deploy] enabled = false"})
    reg = ctx.registry
    with MqttCommandPublisher(d.mqtt) as publish:
        ro = Rollout(reg.db, publish, d.base_url, registry=reg, allow_unsigned=cfg.registry.allow_unsigned,
                     rollback_key=str(d.rollback_key) if d.rollback_key else None,
                     thresholds=Thresholds.from_dict(d.thresholds) if d.thresholds else None)
        dep_id = ro.start(name, version, d.fleet or "", d.stages, d.hold_s, list(d.devices) or None)
        dep = ro.deployment(dep_id)
        deadline = time.monotonic() + d.follow_timeout_s
        while d.follow and dep["state"] == "running" and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.5, d.hold_s / 4)))
            ro.tick()
            dep = ro.deployment(dep_id)
    figures = {"fleet": d.fleet, "stages": dep["stages"], "hold_s": d.hold_s, "state": dep["state"],
               "previous_version": dep["previous_version"],
               "first_stage_devices": sorted(r["device"] for r in dep["devices_sent"] if r["stage_index"] == 0),
               "decisions": [{"decision": x["decision"], "stage_index": x["stage_index"], "reason": x["reason"]}
                             for x in dep["decisions"]]}
    rec = ctx.write_record("deploy", started, t0=t0, inputs={"model": registered["outputs"]["model"]},
                           outputs={"deployment_id": dep_id}, figures=figures)
    source = registered["outputs"].get("source_model")
    reg.record_lineage(name, version, "pipeline", lineage_of(ctx, source))
    if d.follow and dep["state"] != "completed":
        raise PipelineError(f"deployment {dep_id} of {name}:{version} ended {dep['state']}: {dep.get('reason')}"
                            if dep["state"] != "running" else
                            f"deployment {dep_id} still running after [deploy] follow_timeout; the collector "
                            "keeps judging it")
    return rec
