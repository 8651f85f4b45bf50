"""Alert rules over the stored windows: input drift, p95 latency SLA, error-rate spike, confidence drop, offline.

The rules and their thresholds are data: ``edge_sdk/fleet/collector/alerts.toml`` (read by
:func:`~edge_sdk.fleet.collector.alert_rules.load_rules`, re-exported here) documents every key; a user file overrides
some. :class:`AlertEngine` evaluates the rules per device, opens an alert once (never a second one while it is
open), resolves it when the condition clears, and stores both in ``alerts`` (one row per device and rule). What it
tells people is grouped per rule and fleet like Alertmanager does (:mod:`.alert_notify`, ``[notify]`` in
alerts.toml): one log line per group notification and, when a webhook is configured, one POST in Alertmanager's
webhook format (version 4) from a background thread whose result goes to ``alerts.webhook_status`` of every alert
it carried (a slow or failing webhook never holds up ingest or evaluation).

Drift: when the baseline of the window's model version is known (``baselines=`` from ``--bundle``, or the
``manifest`` stored by the model registry) the input counts of the last K windows are pooled and compared
with the baseline histograms (PSI); otherwise the rule votes on the devices' own per-window ``psi_max``
(see the comments in alerts.toml for the measurement behind this choice).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass

from edge_sdk.fleet.collector.alert_notify import Notifier
from edge_sdk.fleet.collector.alert_rules import (
    DEFAULT_RULES_FILE,
    AlertRules,
    ConfidenceRule,
    ConfigError,
    DriftRule,
    ErrorRateRule,
    LatencyRule,
    NotifySettings,
    OfflineRule,
    load_rules,
)
from edge_sdk.fleet.db import Database

__all__ = ["DEFAULT_RULES_FILE", "AlertChange", "AlertEngine", "AlertRules", "ConfidenceRule", "ConfigError",
           "DriftRule", "ErrorRateRule", "LatencyRule", "NotifySettings", "OfflineRule", "load_rules"]

log = logging.getLogger("edge_sdk.fleet.collector.alerts")
_BASELINE_TTL_S = 60.0


@dataclass(frozen=True)
class AlertChange:
    """An alert that was opened or resolved by one evaluation."""

    action: str            # opened | resolved
    id: int
    fleet: str
    device: str | None
    rule: str
    severity: str
    value: float | None
    threshold: float | None
    message: str
    model_version: str | None
    at: float


@dataclass(frozen=True)
class _Verdict:
    firing: bool
    value: float | None = None
    threshold: float | None = None
    message: str = ""


class AlertEngine:
    """Evaluates :class:`AlertRules` on a fleet database, keeps the ``alerts`` table up to date and sends grouped
    notifications (:attr:`notifier`; ``external_url``: the dashboard's address, for the webhook's links)."""

    def __init__(self, db: Database, rules: AlertRules | None = None, *, webhook: str | None = None,
                 baselines: dict[tuple[str, str], dict] | None = None, fleet: str | None = None,
                 external_url: str = "") -> None:
        self.db = db
        self.rules = rules or load_rules()
        self.webhook = webhook
        self.fleet = None if fleet in (None, "+") else fleet
        self._baselines: dict[tuple[str, str], tuple[dict | None, float]] = {
            k: (v, float("inf")) for k, v in (baselines or {}).items()}
        self._posts: queue.Queue[tuple[list[int], dict] | None] = queue.Queue(maxsize=10_000)
        self._poster: threading.Thread | None = None
        if webhook:
            if not webhook.startswith(("http://", "https://")):
                raise ConfigError(f"webhook {webhook!r} must be an http:// or https:// URL")
            self._poster = threading.Thread(target=self._post_loop, name="edge-alerts-webhook", daemon=True)
            self._poster.start()
        self.notifier = Notifier(self.rules.notify, post=self._queue_post if webhook else None,
                                 external_url=external_url)

    # -- evaluation ---------------------------------------------------------------------------------------------
    def evaluate(self, devices: Iterable[tuple[str, str]] | None = None, *, now: float | None = None,
                 collector_started: float | None = None) -> list[AlertChange]:
        """Run every rule for ``devices`` (None: every known device) and the offline rule for all devices."""
        now = time.time() if now is None else now
        known = self.db.query("SELECT fleet, device, state, state_ts, last_seen, window_s FROM devices"
                              + (" WHERE fleet = ?" if self.fleet else ""), (self.fleet,) if self.fleet else ())
        verdicts: dict[tuple[str, str, str], tuple[_Verdict, str | None]] = {}
        targets = sorted({(r["fleet"], r["device"]) for r in known} if devices is None else set(devices))
        for fleet, device in targets:
            if self.fleet and fleet != self.fleet:
                continue
            for rule, (verdict, version) in self._device_verdicts(fleet, device).items():
                verdicts[(fleet, device, rule)] = (verdict, version)
        if self.rules.offline.enabled:
            for r in known:
                verdict = self._offline(r, now, collector_started)
                if verdict is not None:
                    verdicts[(r["fleet"], r["device"], "offline")] = (verdict, None)
        changes = self._apply(verdicts, now)
        self.flush(now)
        return changes

    def flush(self, now: float | None = None) -> list[dict]:
        """Send the group notifications due at ``now`` (:meth:`evaluate` calls it); returns their webhook bodies."""
        return self.notifier.flush(time.time() if now is None else now)

    def _device_verdicts(self, fleet: str, device: str) -> dict[str, tuple[_Verdict, str | None]]:
        R = self.rules
        depth = max(R.drift.windows, R.latency_sla.windows, R.error_rate.windows + R.error_rate.baseline_windows,
                    R.confidence_drop.windows + R.confidence_drop.baseline_windows)
        rows = self.db.query(
            "SELECT window_id, model_name, model_version, count, errors, client_errors, p95_ms, conf_mean, psi_max "
            "FROM windows "
            "WHERE fleet = ? AND device = ? ORDER BY end_ts DESC LIMIT ?", (fleet, device, depth))
        if not rows:
            return {}
        version = rows[0]["model_version"]
        out: dict[str, tuple[_Verdict, str | None]] = {}
        need = max(R.drift.windows if R.drift.enabled else 0, R.latency_sla.windows if R.latency_sla.enabled else 0)
        payloads = self._payloads([r["window_id"] for r in rows[:need]])
        checks = (("drift", R.drift.enabled, lambda: self._drift(rows, payloads)),
                  ("latency_sla", R.latency_sla.enabled, lambda: self._latency(rows, payloads)),
                  ("error_rate", R.error_rate.enabled, lambda: self._error_rate(rows)),
                  ("confidence_drop", R.confidence_drop.enabled, lambda: self._confidence(rows, fleet, device)))
        for rule, enabled, check in checks:
            verdict = check() if enabled else None
            if verdict is not None:
                out[rule] = (verdict, version)
        return out

    def _payloads(self, ids: list[str]) -> dict[str, dict]:
        if not ids:
            return {}
        rows = self.db.query(f"SELECT window_id, payload FROM windows WHERE window_id IN ({', '.join('?' * len(ids))})",
                             ids)
        return {r["window_id"]: json.loads(r["payload"]) for r in rows}

    def _baseline(self, name: str, version: str) -> dict | None:
        hit = self._baselines.get((name, version))
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        baseline = None
        try:
            rows = self.db.query("SELECT manifest FROM models WHERE name = ? AND version = ?", (name, version))
        except Exception:  # no model registry table (older database): no baseline from there
            rows = []
        if rows:
            try:
                baseline = json.loads(rows[0]["manifest"]).get("baseline") or None
            except (ValueError, AttributeError):
                baseline = None
        self._baselines[(name, version)] = (baseline, time.monotonic() + _BASELINE_TTL_S)
        return baseline

    def _drift(self, rows: list[dict], payloads: dict[str, dict]) -> _Verdict | None:
        rule = self.rules.drift
        recent = [r for r in rows[:rule.windows] if r["psi_max"] is not None and r["window_id"] in payloads]
        if not recent:
            return None
        name, version = recent[0]["model_name"], recent[0]["model_version"]
        baseline = self._baseline(name, version) if rule.method != "votes" else None
        channels = (baseline or {}).get("input_channels") or []
        if channels and rule.method != "votes":
            from edge_sdk.baseline import psi

            pooled: list[list[float]] = [[0.0] * len(ch["hist_fractions"]) for ch in channels]
            sampled = 0
            for r in recent:
                if r["model_version"] != version:
                    continue
                inp = payloads[r["window_id"]].get("input") or {}
                sampled += inp.get("sampled", 0)
                for c, ch in enumerate(inp.get("channels", [])[:len(pooled)]):
                    if len(ch["counts"]) == len(pooled[c]):
                        pooled[c] = [a + b for a, b in zip(pooled[c], ch["counts"], strict=True)]
            if sampled < rule.min_samples or not any(sum(p) for p in pooled):
                return None
            value = max(psi(ch["hist_fractions"], p) for ch, p in zip(channels, pooled, strict=False) if sum(p))
            how = f"pooled over the last {len(recent)} windows against the {name} {version} baseline"
            return _Verdict(value > rule.threshold, value, rule.threshold, f"input drift: PSI {value:.3f} "
                            f"{'>' if value > rule.threshold else '<='} {rule.threshold:g} ({how})")
        if rule.method == "pooled":
            return None  # asked for pooled only, and no baseline is known for this model version
        eligible = [r for r in recent if (payloads[r["window_id"]].get("input") or {}).get("sampled", 0)
                    >= rule.min_samples]
        if len(eligible) < rule.min_windows:
            return None
        votes = sum(1 for r in eligible if r["psi_max"] > rule.threshold)
        value = max(r["psi_max"] for r in eligible)
        return _Verdict(votes >= rule.min_windows, value, rule.threshold,
                        f"input drift: psi_max over {rule.threshold:g} in {votes} of the last {len(eligible)} windows "
                        f"(max {value:.3f}; no baseline known for {name} {version}, so per-window votes)")

    def _latency(self, rows: list[dict], payloads: dict[str, dict]) -> _Verdict | None:
        rule = self.rules.latency_sla
        recent = [r for r in rows[:rule.windows] if r["count"] > 0 and r["window_id"] in payloads]
        if sum(r["count"] for r in recent) < rule.min_count:
            return None
        p95s = [r["p95_ms"] for r in recent if r["p95_ms"] is not None]
        if len(p95s) == len(recent) and max(p95s) <= rule.p95_ms:
            # the merged p95 cannot exceed the largest per-window p95: no need to merge sketches
            return _Verdict(False, max(p95s), rule.p95_ms, f"p95 latency <= {rule.p95_ms:g} ms")
        from edge_sdk.sketch import merge_sketches, quantiles

        sketches = [payloads[r["window_id"]]["latency_ms"]["sketch"] for r in recent]
        accuracy = max({s["relative_accuracy"] for s in sketches}, key=lambda a: sum(
            s["count"] for s in sketches if s["relative_accuracy"] == a))
        p95 = quantiles(merge_sketches(s for s in sketches if s["relative_accuracy"] == accuracy), (0.95,))["p95"]
        if p95 is None:
            return None
        return _Verdict(p95 > rule.p95_ms, p95, rule.p95_ms,
                        f"p95 latency {p95:.1f} ms {'>' if p95 > rule.p95_ms else '<='} SLA {rule.p95_ms:g} ms "
                        f"(merged over the last {len(recent)} windows)")

    def _error_rate(self, rows: list[dict]) -> _Verdict | None:
        rule = self.rules.error_rate
        recent, before = rows[:rule.windows], rows[rule.windows:rule.windows + rule.baseline_windows]
        # model/runtime errors only: a client sending garbage (HTTP 4xx, client_errors) must not raise a model alert
        def model_errors(r: dict) -> int:
            return max(0, r["errors"] - (r["client_errors"] or 0))

        errors, total = sum(map(model_errors, recent)), sum(r["count"] + model_errors(r) for r in recent)
        if total < rule.min_events:
            return None
        rate = errors / total
        base_total = sum(r["count"] + model_errors(r) for r in before)
        base = sum(map(model_errors, before)) / base_total if base_total >= rule.min_events else None
        opening = max(rule.threshold, rule.factor * base) if base is not None else rule.threshold
        # opening needs the spike over both; an open alert stays open while the rate is over the absolute threshold
        return _Verdict(rate > opening, rate, opening,
                        f"error rate {rate:.1%} over the last {len(recent)} windows (threshold {rule.threshold:.1%}"
                        + (f", trailing rate {base:.1%}" if base is not None else "") + ")")

    def _confidence(self, rows: list[dict], fleet: str, device: str) -> _Verdict | None:
        rule = self.rules.confidence_drop
        recent = [r for r in rows[:rule.windows] if r["conf_mean"] is not None and r["count"] > 0]
        before = [r for r in rows[rule.windows:rule.windows + rule.baseline_windows]
                  if r["conf_mean"] is not None and r["count"] > 0]
        n = sum(r["count"] for r in recent)
        if n < rule.min_count:
            return None
        cur = sum(r["conf_mean"] * r["count"] for r in recent) / n
        nb = sum(r["count"] for r in before)
        base = sum(r["conf_mean"] * r["count"] for r in before) / nb if nb >= rule.min_count else None
        level = max(rule.floor, base - rule.delta) if base is not None else rule.floor
        return _Verdict(cur < level, cur, level,
                        f"mean confidence {cur:.3f} over the last {len(recent)} windows (floor {rule.floor:g}"
                        + (f", trailing mean {base:.3f} - {rule.delta:g}" if base is not None else "") + ")")

    def _offline(self, dev: dict, now: float, started: float | None) -> _Verdict | None:
        rule = self.rules.offline
        window_s = dev["window_s"] or rule.default_window_s
        limit = rule.missed_windows * window_s
        if dev["state"] == "offline":
            since = now - (dev["state_ts"] or dev["last_seen"])
            return _Verdict(True, since, limit, f"device offline (status) for {since:.0f} s")
        silent = max(0.0, now - dev["last_seen"])
        if started is not None and now - started < limit:
            return None  # the collector just started: the backlog may not be in yet, judge nothing
        if silent <= limit:
            return _Verdict(False, silent, limit, f"device sends again (last message {silent:.0f} s ago)")
        return _Verdict(True, silent, limit, f"no message for {silent:.0f} s (> {rule.missed_windows:g} "
                        f"windows of {window_s:g} s)")

    # -- storing ------------------------------------------------------------------------------------------------
    def _apply(self, verdicts: dict[tuple[str, str, str], tuple[_Verdict, str | None]], now: float
               ) -> list[AlertChange]:
        changes: list[AlertChange] = []
        with self.db.transaction():
            self.db.lock("edge-sdk-alerts")  # several collectors on one database: one evaluates at a time
            open_rows = {(r["fleet"], r["device"], r["rule"]): r for r in self.db.query(
                "SELECT id, fleet, device, rule, severity, threshold, model_version FROM alerts WHERE state = ?",
                ("open",))}
            for key in sorted(verdicts, key=lambda k: (k[0], k[1] or "", k[2])):
                verdict, version = verdicts[key]
                fleet, device, rule = key
                row = open_rows.get(key)
                severity = getattr(self.rules, rule).severity
                if row is None and verdict.firing:
                    new = self.db.query(
                        "INSERT INTO alerts (fleet, device, rule, severity, state, opened_at, model_version, value, "
                        "threshold, message) VALUES (?, ?, ?, ?, 'open', ?, ?, ?, ?, ?) RETURNING id",
                        (fleet, device, rule, severity, now, version, verdict.value, verdict.threshold,
                         verdict.message))
                    changes.append(AlertChange("opened", int(new[0]["id"]), fleet, device, rule, severity,
                                               verdict.value, verdict.threshold, verdict.message, version, now))
                elif row is not None and not self._still_open(rule, verdict, row):
                    message = verdict.message or f"{rule} cleared"
                    self.db.execute("UPDATE alerts SET state = 'resolved', resolved_at = ? WHERE id = ?",
                                    (now, row["id"]))
                    changes.append(AlertChange("resolved", int(row["id"]), fleet, device, rule, row["severity"],
                                               verdict.value, row["threshold"], message, row["model_version"], now))
        for ch in changes:  # per device at debug level: the notifier logs one line per group
            log.debug("alert %s: %s/%s %s: %s", ch.action, ch.fleet, ch.device, ch.rule, ch.message)
        if changes:
            self.notifier.add(changes, self._models({ch.fleet for ch in changes}))
        return changes

    def _models(self, fleets: set[str]) -> dict[tuple[str, str], tuple[str | None, str | None]]:
        """(fleet, device) -> (model name, model version) of the devices of ``fleets`` (notification labels)."""
        out: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        for fleet in sorted(fleets):
            for r in self.db.query("SELECT device, model_name, model_version FROM devices WHERE fleet = ?", (fleet,)):
                out[(fleet, r["device"])] = (r["model_name"], r["model_version"])
        return out

    def _still_open(self, rule: str, verdict: _Verdict, row: dict) -> bool:
        """Resolution hysteresis: error rate resolves under the absolute threshold, confidence above the level
        that opened the alert (so a lasting degradation does not clear itself by becoming its own baseline)."""
        if verdict.firing:
            return True
        if rule == "error_rate" and verdict.value is not None:
            return verdict.value > self.rules.error_rate.threshold
        if rule == "confidence_drop" and verdict.value is not None and row["threshold"] is not None:
            return verdict.value < row["threshold"]
        return False

    # -- webhook ------------------------------------------------------------------------------------------------
    def _queue_post(self, alert_ids: list[int], body: dict) -> None:
        """Queue one group notification (Alertmanager webhook v4 body) for the webhook thread."""
        try:
            self._posts.put_nowait((alert_ids, body))
        except queue.Full:
            self._set_webhook_status(alert_ids, "failed: webhook queue full (the webhook is too slow)")

    def _post_loop(self) -> None:
        while True:
            item = self._posts.get()
            if item is None:
                return
            alert_ids, body = item
            req = urllib.request.Request(self.webhook, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "edge-sdk-collector"})
            try:
                with urllib.request.urlopen(req, timeout=self.rules.webhook_timeout_s) as resp:
                    status = f"sent {resp.status}"
            except urllib.error.HTTPError as exc:
                status = f"failed: HTTP {exc.code}"
            except (urllib.error.URLError, OSError, ValueError) as exc:
                status = f"failed: {getattr(exc, 'reason', exc)}"[:200]
            self._set_webhook_status(alert_ids, status)

    def _set_webhook_status(self, alert_ids: list[int], status: str) -> None:
        try:
            for i in range(0, len(alert_ids), 500):
                chunk = alert_ids[i:i + 500]
                self.db.execute(f"UPDATE alerts SET webhook_status = ? WHERE id IN ({', '.join('?' * len(chunk))})",
                                (status, *chunk))
        except Exception:  # the database is closing or down: the POST result is only informative
            log.warning("could not record webhook status %r of %d alert(s)", status, len(alert_ids))

    def close(self, timeout: float = 5.0) -> None:
        """Finish queued webhook POSTs (up to ``timeout`` seconds) and stop the webhook thread."""
        if self._poster is not None:
            self._posts.put(None)
            self._poster.join(timeout)
            self._poster = None
