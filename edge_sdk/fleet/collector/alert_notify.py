"""Alert notifications grouped the way Alertmanager groups them, and its webhook format (version 4).

The alert engine keeps one row per device and rule in the ``alerts`` table (the dashboard lists them); what it
*tells* people is grouped: alerts are grouped per rule and fleet (Alertmanager's ``group_by: [alertname, fleet]``),
and a group is notified (one log line, one webhook POST) ``group_wait_s`` after its first alert, then at most every
``group_interval_s`` when alerts joined or resolved, and again every ``repeat_interval_s`` while it fires unchanged.
A fleet-wide outage of 1,000 devices is therefore one "firing" notification listing them, and one "resolved"
notification when they are back (``[notify]`` in ``alerts.toml``).

The webhook body is Alertmanager's webhook payload version 4, so receivers written for Alertmanager work unchanged::

    {"version": "4", "status": "firing" | "resolved", "receiver": "edge-sdk",
     "groupKey": "{}:{alertname=..., fleet=...}", "groupLabels": {"alertname", "fleet"},
     "commonLabels": {...}, "commonAnnotations": {...}, "externalURL": "...", "truncatedAlerts": n,
     "alerts": [{"status", "labels": {"alertname", "fleet", "device", "severity", "model", "model_version"},
                 "annotations": {"summary", "description"}, "startsAt", "endsAt", "generatorURL", "fingerprint"}]}

``alerts`` lists firing alerts first; beyond ``max_alerts`` the rest are only counted in ``truncatedAlerts``
(Alertmanager's ``max_alerts``). Group state lives in memory: after a restart, open alerts of the database that
resolve are announced as resolved in a new group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_sdk.fleet.collector.alert_rules import NotifySettings
    from edge_sdk.fleet.collector.alerts import AlertChange

__all__ = ["RECEIVER", "TITLES", "ZERO_TIME", "Notifier", "fingerprint", "rfc3339"]

log = logging.getLogger("edge_sdk.fleet.collector.alerts")

RECEIVER = "edge-sdk"
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of a firing alert
TITLES = {"drift": "input drift", "latency_sla": "p95 latency over the SLA", "error_rate": "error-rate spike",
          "confidence_drop": "confidence drop", "offline": "devices offline"}


def rfc3339(ts: float) -> str:
    """Unix seconds as RFC 3339 UTC (``2026-11-29T10:00:00.123456Z``)."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z")  # noqa: UP017 (3.10)


def fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager's alert fingerprint: FNV-1a 64 of the sorted label names and values, 16 hex digits."""
    h = 0xCBF29CE484222325
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode() + b"\xff":
                h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


@dataclass
class _Member:
    """One alert (one device) of a group."""

    id: int
    device: str | None
    severity: str
    labels: dict[str, str]
    message: str
    starts: float
    ends: float | None = None
    notified: bool = False  # was it in a firing notification yet


@dataclass
class _Group:
    rule: str
    fleet: str
    created: float
    members: dict[int, _Member] = field(default_factory=dict)
    last_sent: float | None = None
    dirty: bool = True


class Notifier:
    """Groups :class:`~edge_sdk.fleet.collector.alerts.AlertChange` s and sends the due notifications.

    ``post(alert_ids, body)`` receives each webhook body (None: log lines only); ``external_url`` is the dashboard's
    address (``externalURL``, and ``generatorURL`` points at its open alerts).
    """

    def __init__(self, settings: NotifySettings, *, post: Callable[[list[int], dict[str, Any]], None] | None = None,
                 external_url: str = "") -> None:
        self.settings = settings
        self.post = post
        self.external_url = external_url.rstrip("/")
        self.groups: dict[tuple[str, str], _Group] = {}
        self.sent: list[dict[str, Any]] = []  # bodies of the notifications sent (the last 100, for inspection)

    def add(self, changes: Iterable[AlertChange], models: dict[tuple[str, str], tuple[str | None, str | None]]
            ) -> None:
        """Put opened alerts into their group and mark resolved ones; ``models``: (fleet, device) -> (model name,
        version) for the labels."""
        for ch in changes:
            key = (ch.rule, ch.fleet)
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = _Group(ch.rule, ch.fleet, ch.at)
            if ch.action == "opened":
                name, version = models.get((ch.fleet, ch.device or ""), (None, None))
                labels = {"alertname": ch.rule, "fleet": ch.fleet, "device": ch.device or "", "severity": ch.severity,
                          "model": name or "", "model_version": ch.model_version or version or ""}
                group.members[ch.id] = _Member(ch.id, ch.device, ch.severity,
                                               {k: v for k, v in labels.items() if v}, ch.message, ch.at)
                group.dirty = True
                continue
            member = group.members.get(ch.id)
            if member is None:  # opened before this process started: announce its resolution on its own
                name, version = models.get((ch.fleet, ch.device or ""), (None, None))
                labels = {"alertname": ch.rule, "fleet": ch.fleet, "device": ch.device or "", "severity": ch.severity,
                          "model": name or "", "model_version": ch.model_version or version or ""}
                member = group.members[ch.id] = _Member(ch.id, ch.device, ch.severity,
                                                        {k: v for k, v in labels.items() if v}, ch.message, ch.at,
                                                        notified=True)
            if not member.notified:  # opened and resolved between two notifications: nobody was told, say nothing
                del group.members[ch.id]
            else:
                member.ends, member.message = ch.at, ch.message
                group.dirty = True
            if not group.members:
                del self.groups[key]

    def flush(self, now: float) -> list[dict[str, Any]]:
        """Send every notification that is due at ``now``; returns their webhook bodies."""
        s = self.settings
        out = []
        for key, g in list(self.groups.items()):
            if g.last_sent is None:
                due = now >= g.created + s.group_wait_s
            else:
                due = now >= g.last_sent + s.group_interval_s and (g.dirty or (
                    s.repeat_interval_s > 0 and now >= g.last_sent + s.repeat_interval_s))
            if not due:
                continue
            body = self._body(g)
            self._log(g)
            ids = [m.id for m in g.members.values()]
            for m in list(g.members.values()):
                if m.ends is not None:
                    del g.members[m.id]
                else:
                    m.notified = True
            g.last_sent, g.dirty = now, False
            if not g.members:
                del self.groups[key]
            if self.post is not None:
                self.post(ids, body)
            out.append(body)
        self.sent = (self.sent + out)[-100:]
        return out

    # -- formatting ------------------------------------------------------------------------------------------
    def _alert(self, m: _Member, g: _Group) -> dict[str, Any]:
        return {"status": "resolved" if m.ends is not None else "firing", "labels": dict(m.labels),
                "annotations": {"summary": f"{TITLES.get(g.rule, g.rule)} in fleet {g.fleet}",
                                "description": m.message},
                "startsAt": rfc3339(m.starts), "endsAt": rfc3339(m.ends) if m.ends is not None else ZERO_TIME,
                "generatorURL": f"{self.external_url}/api/alerts?state=open" if self.external_url else "",
                "fingerprint": fingerprint(m.labels)}

    def _body(self, g: _Group) -> dict[str, Any]:
        members = sorted(g.members.values(), key=lambda m: (m.ends is not None, m.device or "", m.id))
        alerts = [self._alert(m, g) for m in members]
        common_labels = _common([a["labels"] for a in alerts])
        common_annotations = _common([a["annotations"] for a in alerts])
        limit = self.settings.max_alerts
        shown = alerts[:limit] if limit > 0 else alerts
        group_labels = {"alertname": g.rule, "fleet": g.fleet}
        firing = any(m.ends is None for m in members)
        return {"version": "4", "status": "firing" if firing else "resolved", "receiver": RECEIVER,
                "groupKey": "{}:{" + ", ".join(f'{k}="{v}"' for k, v in sorted(group_labels.items())) + "}",
                "groupLabels": group_labels, "commonLabels": common_labels, "commonAnnotations": common_annotations,
                "externalURL": self.external_url, "truncatedAlerts": len(alerts) - len(shown), "alerts": shown}

    def _log(self, g: _Group) -> None:
        firing = sorted((m for m in g.members.values() if m.ends is None), key=lambda m: m.device or "")
        resolved = sorted((m for m in g.members.values() if m.ends is not None), key=lambda m: m.device or "")
        parts = []
        if firing:
            new = sum(1 for m in firing if not m.notified)
            parts.append(f"{len(firing)} firing" + (f" ({new} new)" if g.last_sent is not None and new else "")
                         + f": {self._sample(firing)}")
        if resolved:
            parts.append(f"{len(resolved)} resolved: {self._sample(resolved)}")
        status = "firing" if firing else "resolved"
        log.warning("alerts %s: %s in fleet %s: %s", status, g.rule, g.fleet, "; ".join(parts))

    def _sample(self, members: list[_Member]) -> str:
        n = self.settings.sample_devices
        names = [m.device or "(fleet)" for m in members[:n]]
        return ", ".join(names) + (f" and {len(members) - n} more" if len(members) > n else "")


def _common(dicts: list[dict[str, str]]) -> dict[str, str]:
    """The key/value pairs every dict shares (Alertmanager's commonLabels / commonAnnotations)."""
    if not dicts:
        return {}
    common = dict(dicts[0])
    for d in dicts[1:]:
        common = {k: v for k, v in common.items() if d.get(k) == v}
    return common
