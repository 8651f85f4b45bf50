"""Staged rollout of a registry version to a fleet, judged by the fleet's own telemetry.

A deployment sends the desired model to one stage of devices at a time as a **retained** ``cmd/update``
(``command.schema.json``) on ``edge/<fleet>/<device>/cmd/update``. Stages are cumulative percentages, e.g.
``5,25,100``. Stage membership is deterministic: :func:`stage_of` hashes the device id (sha256) into a bucket
0..99 and the device joins the first stage whose percentage exceeds its bucket, so the same 5% of a fleet
always go first, whatever the model (if that leaves the first stage empty on a small fleet, the device with the
lowest bucket goes first).

:meth:`Rollout.tick` (called periodically by the collector, or by ``edge-sdk deploy --follow``) judges each
running deployment once its stage has been held for ``hold_s``: the windows of the devices that received the
new version and report it (the canary) are compared with the windows of the previous version over the hold
period (the reference), by error rate, p95 latency (merged DDSketches), mean confidence and input drift (PSI),
with the limits of :class:`Thresholds`. Healthy -> advance to the next stage (or complete: the version becomes
active in the registry); unhealthy -> roll back: a retained ``cmd/update`` naming the previous version goes to
exactly the devices that received the new one (if the previous version is not in the registry, their retained
update is cleared and ``cmd/rollback`` asks the agent for the version it kept instead — never both, since an agent
that switched to the previous version and then swapped on ``cmd/rollback`` would end up on the new version again);
too little canary data -> hold, and halt
once ``max_hold_factor`` hold periods passed without enough data, or when too many canary devices reported
``update.failed``. Every decision is stored in ``rollout_decisions`` with its figures.

Devices refuse a lower ``version_code`` and another model unless a rollback authorisation signed by a release
key names the change (issue 13, :mod:`edge_sdk.rollback_auth`). With ``rollback_key`` the rollout signs one when
it starts a deployment (kept in the ``start`` decision's figures, so a collector without the key can still roll
back) and again at rollback time; every rollback command carries it and names its target version. A deployment
of a version with a ``version_code`` is refused without ``rollback_key``, since devices could not be rolled back.
Unsigned versions are deployed only with ``allow_unsigned``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from edge_sdk.errors import EdgeSDKError, RolloutError
from edge_sdk.fleet.lifecycle.bundle_server import bundle_path
from edge_sdk.fleet.lifecycle.canary import Thresholds, health_checks, window_figures
from edge_sdk.fleet.lifecycle.commands import command_payload
from edge_sdk.fleet.lifecycle.registry import ModelRecord, Registry, require_verified
from edge_sdk.topics import cmd_topic, validate_id

if TYPE_CHECKING:
    from edge_sdk.fleet.db import Database

__all__ = ["Decision", "PublishFn", "Rollout", "RolloutError", "Thresholds", "parse_duration", "parse_stages",
           "stage_of"]

log = logging.getLogger(__name__)

PublishFn = Callable[[str, bytes, bool], None]
"""``publish(topic, payload, retain)``: send one QoS 1 message, return once the broker acknowledged it, raise if not."""

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_MAX_REFERENCE_WINDOWS = 5000


@dataclass(frozen=True)
class Decision:
    """One recorded rollout decision."""

    deployment_id: str
    decision: str  # start | advance | hold | halt | rollback | complete
    stage_index: int
    reason: str
    figures: dict[str, Any]


def _bucket(device_id: str) -> int:
    """0..99 from the sha256 of the device id."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big") % 100


def stage_of(device_id: str, stages: Sequence[int]) -> int:
    """Index of the first stage whose cumulative percentage exceeds the device's bucket (sha256 of its id, 0..99).

    Deterministic across processes, runs and models: the same devices always go first, and a device in the
    first x % of one plan is in the first y % of any plan with y >= x.
    """
    bucket = _bucket(device_id)
    return next((i for i, pct in enumerate(stages) if pct > bucket), len(stages) - 1)


def parse_stages(stages: str | Iterable[int]) -> tuple[int, ...]:
    """``"5,25,100"`` (or a sequence) -> (5, 25, 100): strictly increasing percentages ending at 100."""
    try:
        out = tuple(int(s) for s in (stages.split(",") if isinstance(stages, str) else stages))
    except ValueError:
        raise RolloutError(f"stages {stages!r} must be comma-separated whole percentages, e.g. 5,25,100") from None
    if not out or out[-1] != 100 or any(not 0 < s <= 100 for s in out) or list(out) != sorted(set(out)):
        raise RolloutError(f"stages {stages!r} must be increasing percentages in 1..100 ending with 100, "
                           "e.g. 5,25,100")
    return out


def parse_duration(text: str | float | int) -> float:
    """``"30s"``, ``"10m"``, ``"1h"``, ``"2d"`` or plain seconds -> seconds (> 0)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _DURATION.match(text)
        if not m:
            raise RolloutError(f"duration {text!r} is not understood: use e.g. 30s, 10m, 1h")
        value = float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]
    if value <= 0:
        raise RolloutError(f"duration {text!r} must be > 0")
    return value


class Rollout:
    """Start, judge and roll back staged deployments (state in the fleet database, commands over MQTT).

    ``publish`` sends one command (see :data:`PublishFn`); ``base_url`` is where devices download archives
    (``<base_url>/bundles/<name>/<version>.tar.gz``, or a template with ``{name}`` and ``{version}``); it is
    needed to start deployments only (each deployment stores its own). ``thresholds`` are used for deployments
    started here; each deployment is judged by the thresholds stored with it. ``rollback_key``: an ed25519
    private key (``edge-sdk keys new``, one the devices trust) to sign rollback authorisations;
    ``rollback_ttl_s`` how long one stays valid. ``allow_unsigned``: deploy versions whose signature was not
    verified (development only).
    """

    def __init__(self, db: Database, publish: PublishFn, base_url: str | None = None, *,
                 thresholds: Thresholds | None = None, registry: Registry | None = None,
                 rollback_key: str | os.PathLike | None = None, rollback_ttl_s: float = 30 * 86400.0,
                 allow_unsigned: bool = False) -> None:
        self.db = db
        self.publish = publish
        self.base_url = base_url
        self.thresholds = thresholds or Thresholds()
        self.registry = registry or Registry(db)
        self.rollback_key = rollback_key
        self.rollback_ttl_s = rollback_ttl_s
        self.allow_unsigned = allow_unsigned
        self._lock = threading.Lock()

    # ---- commands ---------------------------------------------------------------------------------------------

    @staticmethod
    def model_url(base_url: str, name: str, version: str) -> str:
        """Download URL of an archive under ``base_url`` (a plain base, or a ``{name}``/``{version}`` template)."""
        if "{name}" in base_url or "{version}" in base_url:
            return base_url.format(name=quote(name, safe=""), version=quote(version, safe=""))
        return base_url.rstrip("/") + bundle_path(name, version)

    def _model_block(self, rec: ModelRecord, base_url: str) -> dict[str, Any]:
        return {"name": rec.name, "version": rec.version, "url": self.model_url(base_url, rec.name, rec.version),
                "sha256": rec.bundle_sha256, "size_bytes": rec.size_bytes}

    def _send_update(self, dep: dict[str, Any], device: str, stage: int, rec: ModelRecord, now: float) -> None:
        payload = command_payload("update", model=self._model_block(rec, dep["base_url"]), deployment_id=dep["id"])
        self.publish(cmd_topic(dep["fleet"], device, "update"), payload, True)
        self.db.execute("INSERT INTO deployment_devices (deployment_id, device, stage_index, sent_at) "
                        "VALUES (?, ?, ?, ?)", (dep["id"], device, stage, now))

    # ---- targets ----------------------------------------------------------------------------------------------

    def _targets(self, dep: dict[str, Any]) -> dict[str, int]:
        """device -> stage index for every device the deployment covers."""
        stages = parse_stages(dep["stages"])
        if dep.get("devices"):
            devices = json.loads(dep["devices"])
        else:
            devices = [r["device"] for r in self.db.query(
                "SELECT device FROM devices WHERE fleet = ? AND model_name = ?", (dep["fleet"], dep["name"]))]
        out = {d: stage_of(d, stages) for d in devices}
        if out and 0 not in out.values():  # a small fleet: the lowest bucket goes first so stage 0 is never empty
            out[min(out, key=lambda d: (_bucket(d), d))] = 0
        return out

    def _previous_version(self, fleet: str, name: str, version: str) -> str | None:
        active = self.registry.active(name)
        if active is not None and active.version != version:
            return active.version
        rows = self.db.query("SELECT model_version, COUNT(*) AS n FROM devices WHERE fleet = ? AND model_name = ? "
                             "AND model_version <> ? GROUP BY model_version ORDER BY n DESC", (fleet, name, version))
        return rows[0]["model_version"] if rows else None

    # ---- start ------------------------------------------------------------------------------------------------

    def start(self, name: str, version: str, fleet: str, stages: str | Sequence[int] = (5, 25, 100),
              hold_s: float | str = 600, devices: Sequence[str] | None = None, *, now: float | None = None,
              allow_unsigned: bool | None = None) -> str:
        """Start a deployment and send the new version to the first stage; returns the deployment id.

        Refused for a version whose signature was not verified (unless ``allow_unsigned``, default: the
        Rollout's), whose signed ``fleets`` exclude ``fleet``, or that has a ``version_code`` while the Rollout
        has no ``rollback_key`` (its devices could not be rolled back)."""
        if self.base_url is None:
            raise RolloutError("no base URL for bundle downloads: pass --base-url http://COLLECTOR:PORT")
        validate_id(fleet, "fleet")
        stage_t = parse_stages(stages)
        hold = parse_duration(hold_s)
        for d in devices or ():
            validate_id(d, "device")
        rec = self.registry.show(name, version)
        if rec.state not in ("canary", "active"):
            raise RolloutError(f"{rec.ref} is {rec.state}, not promoted: run `edge-sdk registry promote {name} "
                               f"{version}` first (the evaluation gate)")
        try:
            require_verified(rec, "deploy", self.allow_unsigned if allow_unsigned is None else allow_unsigned)
        except EdgeSDKError as exc:
            raise RolloutError(str(exc)) from None
        fleets = rec.manifest.get("fleets")
        if fleets and fleet not in fleets:
            raise RolloutError(f"{rec.ref} is signed to run only in fleet(s) {', '.join(fleets)}, not {fleet}: "
                               "re-sign it with `edge-sdk bundle sign --fleet` or deploy it there")
        if rec.manifest.get("version_code") is not None and self.rollback_key is None:
            raise RolloutError(f"{rec.ref} has a version_code, so its devices accept a rollback only with a signed "
                               "authorisation: pass rollback_key=KEY (CLI --rollback-key KEY, a release key the "
                               "devices trust)")
        now = time.time() if now is None else now
        dep_id = uuid.uuid4().hex
        with self.db.transaction():
            self.db.lock(f"rollout:{fleet}")
            busy = self.db.query("SELECT id, version FROM deployments WHERE fleet = ? AND name = ? AND state = "
                                 "'running'", (fleet, name))
            if busy:
                raise RolloutError(f"deployment {busy[0]['id']} of {name}:{busy[0]['version']} is still running in "
                                   f"fleet {fleet}: wait for it, or `edge-sdk rollback {name} --fleet {fleet}`")
            dep = {"id": dep_id, "name": name, "version": version,
                   "previous_version": self._previous_version(fleet, name, version), "fleet": fleet,
                   "stages": ",".join(map(str, stage_t)), "hold_s": hold, "state": "running", "stage_index": 0,
                   "stage_started_at": now, "next_check_at": now + hold,
                   "devices": json.dumps(sorted(set(devices))) if devices else None, "base_url": self.base_url,
                   "thresholds": json.dumps(asdict(self.thresholds)), "created_at": now}
            targets = self._targets(dep)
            if not targets:
                raise RolloutError(f"no device of fleet {fleet} runs {name}: devices appear once they report "
                                   "telemetry, or pass --devices a,b,c")
            self.db.execute(f"INSERT INTO deployments ({', '.join(dep)}) VALUES ({', '.join('?' * len(dep))})",
                            tuple(dep.values()))
            per_stage = [sum(1 for s in targets.values() if s == i) for i in range(len(stage_t))]
            auth = self._sign_rollback(dep, f"rollback of deployment {dep_id}", now)
            self._record(dep_id, now, 0, "start", {"stages": list(stage_t), "devices_per_stage": per_stage,
                                                   "previous_version": dep["previous_version"], "hold_s": hold,
                                                   "rollback_authorisation": auth},
                         f"rolling out {name}:{version} to fleet {fleet} in stages {dep['stages']}")
        self._send_stage(dep, 0, rec, targets, now)
        return dep_id

    def _send_stage(self, dep: dict[str, Any], stage: int, rec: ModelRecord, targets: dict[str, int],
                    now: float) -> int:
        sent = {r["device"] for r in self.db.query("SELECT device FROM deployment_devices WHERE deployment_id = ?",
                                                   (dep["id"],))}
        todo = sorted(d for d, s in targets.items() if s <= stage and d not in sent)
        for device in todo:
            self._send_update(dep, device, stage, rec, now)
        return len(todo)

    # ---- judging ----------------------------------------------------------------------------------------------

    def _record(self, dep_id: str, now: float, stage: int, decision: str, figures: dict[str, Any],
                reason: str) -> Decision:
        self.db.execute("INSERT INTO rollout_decisions (deployment_id, ts, stage_index, decision, figures, reason) "
                        "VALUES (?, ?, ?, ?, ?, ?)", (dep_id, now, stage, decision, json.dumps(figures), reason))
        log.info("deployment %s stage %d: %s — %s", dep_id, stage, decision, reason)
        return Decision(dep_id, decision, stage, reason, figures)

    def tick(self, now: float | None = None) -> list[Decision]:
        """Judge every running deployment that is due; return the decisions made (holds included)."""
        now = time.time() if now is None else now
        out: list[Decision] = []
        with self._lock:
            due = self.db.query("SELECT * FROM deployments WHERE state = 'running' AND next_check_at <= ? "
                                "ORDER BY created_at", (now,))
            for dep in due:
                # claim it: with several collectors only the one whose update wins judges this round
                claimed = self.db.execute("UPDATE deployments SET next_check_at = ? WHERE id = ? AND state = "
                                          "'running' AND next_check_at = ?",
                                          (now + max(float(dep["hold_s"]), 1.0), dep["id"], dep["next_check_at"]))
                if claimed != 1:
                    continue
                try:
                    decision = self._judge(dep, now)
                except EdgeSDKError as exc:  # e.g. the broker refused a command: retry soon, judge the others
                    log.warning("deployment %s: %s; retrying in 30 s", dep["id"], exc)
                    self._set(dep["id"], next_check_at=now + min(float(dep["hold_s"]), 30.0))
                    continue
                if decision is not None:
                    out.append(decision)
        return out

    def _window_rows(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        return self.db.query("SELECT w.device, w.count, w.errors, w.conf_mean, w.psi_max, w.payload FROM windows w "
                             + sql, params)

    def _judge(self, dep: dict[str, Any], now: float) -> Decision | None:
        stages = parse_stages(dep["stages"])
        stage, hold = int(dep["stage_index"]), float(dep["hold_s"])
        t = Thresholds.from_dict(json.loads(dep["thresholds"]))
        rec = self.registry.show(dep["name"], dep["version"])
        targets = self._targets(dep)
        self._send_stage(dep, stage, rec, targets, now)  # devices that joined, or a publish that failed earlier
        self._refresh_acks(dep, now)
        since = float(dep["stage_started_at"])
        if now < since + hold:
            self._set(dep["id"], next_check_at=since + hold)
            return None
        sent = self.db.query("SELECT device, acked_version FROM deployment_devices WHERE deployment_id = ?",
                             (dep["id"],))
        canary = window_figures(self._window_rows(
            "JOIN deployment_devices d ON d.device = w.device AND d.deployment_id = ? WHERE w.fleet = ? AND "
            "w.model_name = ? AND w.model_version = ? AND w.end_ts > ? AND w.end_ts <= ?",
            (dep["id"], dep["fleet"], dep["name"], dep["version"], since, now)))
        ref, ref_since = self._reference(dep, since, now, t)
        failed = self._update_failures(dep, since)
        figures: dict[str, Any] = {
            "stage": {"index": stage, "percent": stages[stage], "devices_sent": len(sent),
                      "devices_on_new_version": sum(1 for s in sent if s["acked_version"] == dep["version"]),
                      "held_s": round(now - since, 3)},
            "canary": canary, "reference": {**ref, "version": dep["previous_version"], "since": ref_since},
            "update_failed_devices": failed,
        }
        if sent and len(failed) / len(sent) > t.max_update_failure_frac:
            return self._halt(dep, now, figures, f"{len(failed)} of {len(sent)} devices reported update.failed "
                              f"({', '.join(failed[:5])}): check their events, then roll back or fix the bundle")
        if canary["windows"] < t.min_windows or canary["count"] < t.min_count:
            need = f"{canary['windows']}/{t.min_windows} windows, {canary['count']}/{t.min_count} inferences"
            if now >= since + hold * t.max_hold_factor:
                return self._halt(dep, now, figures, f"not enough telemetry from canary devices on "
                                  f"{dep['version']} after {now - since:.0f} s ({need}): check that they updated")
            self._set(dep["id"], next_check_at=now + min(hold, 60.0))
            return self._record(dep["id"], now, stage, "hold", figures, f"waiting for canary telemetry ({need})")
        checks = health_checks(canary, ref, t)
        figures["checks"] = checks
        bad = [f"{k} {c['value']:.4g} vs limit {c['limit']:.4g}" for k, c in checks.items() if not c["ok"]]
        if bad:
            return self._rollback(dep, now, figures, "canary unhealthy: " + "; ".join(bad))
        summary = ", ".join(f"{k} {c['value']:.4g} (limit {c['limit']:.4g})" for k, c in checks.items()) or \
            "no reference to compare with"
        if stage + 1 >= len(stages):
            decision = self._finish(dep["id"], now, stage, "complete", figures,
                                    f"healthy at {stages[stage]}%: {summary}", "completed", "all stages healthy")
            self.registry.set_state(dep["name"], dep["version"], "active",
                                    f"deployment {dep['id']} completed in fleet {dep['fleet']}",
                                    figures={"deployment_id": dep["id"]})
            return decision
        self._set(dep["id"], stage_index=stage + 1, stage_started_at=now, next_check_at=now + hold)
        decision = self._record(dep["id"], now, stage, "advance", figures,
                                f"healthy at {stages[stage]}%, advancing to {stages[stage + 1]}%: {summary}")
        self._send_stage(dep, stage + 1, rec, targets, now)
        return decision

    def _reference(self, dep: dict[str, Any], since: float, now: float, t: Thresholds) -> tuple[dict[str, Any], float]:
        """Previous-version windows over the hold period; since the deployment began (minus a hold) if too few."""
        prev = dep["previous_version"]
        cond = "w.model_version = ?" if prev is not None else "w.model_version <> ?"
        sql = (f"WHERE w.fleet = ? AND w.model_name = ? AND {cond} AND w.end_ts > ? AND w.end_ts <= ? "
               f"ORDER BY w.end_ts DESC LIMIT {_MAX_REFERENCE_WINDOWS}")
        base = (dep["fleet"], dep["name"], prev if prev is not None else dep["version"])
        rows = self._window_rows(sql, (*base, since, now))
        if len(rows) < t.min_windows:
            since = float(dep["created_at"]) - float(dep["hold_s"])
            rows = self._window_rows(sql, (*base, since, now))
        return window_figures(rows), since

    def _update_failures(self, dep: dict[str, Any], since: float) -> list[str]:
        rows = self.db.query("SELECT DISTINCT e.device FROM events e JOIN deployment_devices d ON d.device = e.device "
                             "AND d.deployment_id = ? WHERE e.fleet = ? AND e.kind = 'update.failed' AND e.ts >= ?",
                             (dep["id"], dep["fleet"], since))
        return sorted(r["device"] for r in rows)

    def _refresh_acks(self, dep: dict[str, Any], now: float) -> None:
        rows = self.db.query("SELECT d.device, v.model_version FROM deployment_devices d JOIN devices v ON "
                             "v.fleet = ? AND v.device = d.device WHERE d.deployment_id = ? AND v.model_name = ?",
                             (dep["fleet"], dep["id"], dep["name"]))
        for r in rows:
            self.db.execute("UPDATE deployment_devices SET acked_version = ?, acked_at = ? WHERE deployment_id = ? "
                            "AND device = ? AND (acked_version IS NULL OR acked_version <> ?)",
                            (r["model_version"], now, dep["id"], r["device"], r["model_version"]))

    def _finish(self, dep_id: str, now: float, stage: int, decision: str, figures: dict[str, Any], reason: str,
                state: str, state_reason: str) -> Decision:
        """Record ``decision`` and end the deployment in ``state``, in one transaction: a reader who sees the final
        state also sees the decision that explains it."""
        with self.db.transaction():
            made = self._record(dep_id, now, stage, decision, figures, reason)
            self._set(dep_id, state=state, finished_at=now, reason=state_reason)
        return made

    def _set(self, dep_id: str, **cols: Any) -> None:
        self.db.execute(f"UPDATE deployments SET {', '.join(f'{k} = ?' for k in cols)} WHERE id = ?",
                        (*cols.values(), dep_id))

    def _halt(self, dep: dict[str, Any], now: float, figures: dict[str, Any], reason: str) -> Decision:
        return self._finish(dep["id"], now, int(dep["stage_index"]), "halt", figures, reason, "halted", reason)

    # ---- rollback ---------------------------------------------------------------------------------------------

    def _sign_rollback(self, dep: dict[str, Any], reason: str, now: float) -> dict[str, Any] | None:
        """A rollback authorisation from the deployed version to the previous one (None without a key)."""
        if self.rollback_key is None:
            return None
        from edge_sdk.rollback_auth import sign_rollback

        new = self.registry.get(dep["name"], dep["version"])
        prev = self.registry.get(dep["name"], dep["previous_version"]) if dep["previous_version"] else None
        return sign_rollback(self.rollback_key, name=dep["name"], fleet=dep["fleet"], from_version=dep["version"],
                             from_version_code=new.manifest.get("version_code") if new else None,
                             to_version=dep["previous_version"],
                             to_version_code=prev.manifest.get("version_code") if prev else None,
                             deployment_id=dep["id"], reason=reason, ttl_s=self.rollback_ttl_s)  # wall clock

    def _rollback_authorisation(self, dep: dict[str, Any], reason: str, now: float) -> dict[str, Any] | None:
        """A fresh authorisation when this Rollout has the key, else the one signed when the deployment started."""
        fresh = self._sign_rollback(dep, reason, now)
        if fresh is not None:
            return fresh
        rows = self.db.query("SELECT figures FROM rollout_decisions WHERE deployment_id = ? AND decision = 'start'",
                             (dep["id"],))
        auth = json.loads(rows[0]["figures"]).get("rollback_authorisation") if rows else None
        if auth is None:
            log.warning("deployment %s: no rollback authorisation (no rollback_key): devices that keep a signed "
                        "version order will refuse this rollback", dep["id"])
        return auth

    def _rollback(self, dep: dict[str, Any], now: float, figures: dict[str, Any], reason: str) -> Decision:
        prev = self.registry.get(dep["name"], dep["previous_version"]) if dep["previous_version"] else None
        auth = self._rollback_authorisation(dep, reason, now)
        targets = self.db.query("SELECT device FROM deployment_devices WHERE deployment_id = ? AND rolled_back_at IS "
                                "NULL ORDER BY device", (dep["id"],))
        for r in targets:
            device = r["device"]
            topic = cmd_topic(dep["fleet"], device, "update")
            if prev is not None:  # the desired model is the previous version again (retained: offline devices too)
                self.publish(topic, command_payload("update", model=self._model_block(prev, dep["base_url"]),
                                                    deployment_id=dep["id"], authorisation=auth), True)
            else:  # not in the registry: clear the desired model and ask the agent for the version it kept
                self.publish(topic, b"", True)
                self.publish(cmd_topic(dep["fleet"], device, "rollback"),
                             command_payload("rollback", deployment_id=dep["id"], reason=reason[:200],
                                             target_version=dep["previous_version"], authorisation=auth), False)
            self.db.execute("UPDATE deployment_devices SET rolled_back_at = ? WHERE deployment_id = ? AND device = ?",
                            (now, dep["id"], device))
        figures = {**figures, "rolled_back_devices": [r["device"] for r in targets],
                   "authorisation": auth["statement"]["id"] if auth else None}
        decision = self._finish(dep["id"], now, int(dep["stage_index"]), "rollback", figures,
                                f"{reason}; {len(targets)} device(s) sent back to "
                                f"{dep['previous_version'] or 'their previous model'}", "rolled_back", reason)
        rec = self.registry.get(dep["name"], dep["version"])
        if rec is not None and rec.state in ("canary", "active"):
            self.registry.set_state(dep["name"], dep["version"], "retired", f"deployment {dep['id']} rolled back: "
                                    f"{reason}", figures={"deployment_id": dep["id"]})
        if prev is not None and prev.state != "active":
            self.registry.activate(dep["name"], prev.version, f"restored by rollback of deployment {dep['id']}")
        return decision

    def rollback(self, name: str, fleet: str, *, reason: str = "rolled back by hand",
                 now: float | None = None) -> Decision:
        """Roll back the latest running, halted or completed deployment of ``name`` in ``fleet``."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self.db.query("SELECT * FROM deployments WHERE fleet = ? AND name = ? AND state IN ('running', "
                                 "'halted', 'completed') ORDER BY created_at DESC", (fleet, name))
            if not rows:
                raise RolloutError(f"no deployment of {name} in fleet {fleet} to roll back (see `edge-sdk deploy`)")
            return self._rollback(rows[0], now, {}, reason)

    # ---- reading ----------------------------------------------------------------------------------------------

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        """A deployment row with its devices and decisions (figures parsed)."""
        rows = self.db.query("SELECT * FROM deployments WHERE id = ?", (deployment_id,))
        if not rows:
            raise RolloutError(f"no deployment {deployment_id}")
        dep = rows[0]
        dep["devices_sent"] = self.db.query("SELECT * FROM deployment_devices WHERE deployment_id = ? ORDER BY "
                                            "stage_index, device", (deployment_id,))
        dep["decisions"] = self.decisions(deployment_id)
        return dep

    def decisions(self, deployment_id: str) -> list[dict[str, Any]]:
        """The recorded decisions of a deployment, oldest first (figures parsed)."""
        rows = self.db.query("SELECT * FROM rollout_decisions WHERE deployment_id = ? ORDER BY ts, id",
                             (deployment_id,))
        for r in rows:
            r["figures"] = json.loads(r["figures"])
        return rows
