"""The collector's storing path: validate a batch of MQTT messages and store it in ONE transaction.

* windows and events are inserted with ``ON CONFLICT DO NOTHING`` on their ids, so a re-delivered message
  is stored once (and counted as a duplicate);
* a status message upserts the device (``online``/``offline``, model) unless a newer status is stored;
* every message moves its device's ``last_seen``;
* anything that fails validation goes to ``dead_letters`` with its reason;
* a stream belongs to the device that first sent it (``streams`` row): a window or ``resend.unavailable`` naming
  another device's stream is dead-lettered, so no device can fill, block or declare lost another's seqs;
* a window's ``client_errors`` (bad client input, not the model's fault) gets its own column;
* per outbox stream the ``streams`` row keeps ``contiguous_seq`` (every seq up to it is stored or declared
  lost) and ``max_seq``; gap repair (:mod:`edge_sdk.fleet.collector.service`) asks devices for the missing seqs.

The stream state is kept in the database, not in memory, so several collectors sharing one subscription
(each sees part of every stream) agree; PostgreSQL locks the stream row (``FOR UPDATE``) while advancing.
If the batch transaction fails, messages are retried one by one and one that the database refuses is
dead-lettered; if even that fails the database is down: :class:`StoreUnavailable` is raised and the caller
keeps the batch (unacknowledged) to retry.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_sdk.errors import StoreUnavailable
from edge_sdk.fleet.collector.retention import RetentionPolicy, apply_retention
from edge_sdk.fleet.collector.validate import (
    MAX_PAYLOAD_BYTES,
    PayloadError,
    client_error_count,
    stream_of,
    validate_message,
)
from edge_sdk.fleet.db import Database
from edge_sdk.topics import parse_topic

__all__ = ["BatchResult", "Ingestor", "Message", "StoreUnavailable", "StreamGap"]

log = logging.getLogger("edge_sdk.fleet.collector.ingest")

_INSERT_WINDOW = (
    "INSERT INTO windows (window_id, fleet, device, stream, seq, model_name, model_version, start_ts, end_ts, "
    "received_at, count, errors, client_errors, p50_ms, p95_ms, p99_ms, conf_mean, psi_max, fb_labelled, fb_correct, "
    "dropped_windows, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT DO NOTHING")  # a window_id or a (stream, seq) stored before: a duplicate
_INSERT_EVENT = ("INSERT INTO events (event_id, fleet, device, ts, received_at, kind, level, data) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING")
_INSERT_DEAD = "INSERT INTO dead_letters (received_at, topic, reason, payload) VALUES (?, ?, ?, ?)"
_NEWER = "(devices.state_ts IS NULL OR excluded.state_ts >= devices.state_ts)"
_UPSERT_STATUS = (
    "INSERT INTO devices (fleet, device, state, state_ts, state_reason, first_seen, last_seen, model_name, "
    "model_version, artifact, runtime, agent_version, window_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (fleet, device) DO UPDATE SET "
    f"state = CASE WHEN {_NEWER} THEN excluded.state ELSE devices.state END, "
    f"state_reason = CASE WHEN {_NEWER} THEN excluded.state_reason ELSE devices.state_reason END, "
    + ", ".join(f"{c} = CASE WHEN {_NEWER} AND excluded.{c} IS NOT NULL THEN excluded.{c} ELSE devices.{c} END"
                for c in ("model_name", "model_version", "artifact", "runtime", "agent_version", "window_s"))
    + f", state_ts = CASE WHEN {_NEWER} THEN excluded.state_ts ELSE devices.state_ts END, "
    "last_seen = CASE WHEN excluded.last_seen > devices.last_seen THEN excluded.last_seen ELSE devices.last_seen END")
_TOUCH_DEVICE = (
    "INSERT INTO devices (fleet, device, first_seen, last_seen, model_name, model_version, artifact, runtime) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device) DO UPDATE SET "
    "last_seen = CASE WHEN excluded.last_seen > devices.last_seen THEN excluded.last_seen ELSE devices.last_seen END, "
    + ", ".join(f"{c} = COALESCE(excluded.{c}, devices.{c})"
                for c in ("model_name", "model_version", "artifact", "runtime")))


@dataclass
class Message:
    """One received MQTT message; ``token`` is whatever the transport needs to acknowledge it."""

    topic: str
    payload: bytes
    received_at: float
    token: Any = None


@dataclass
class BatchResult:
    """What one stored batch did."""

    received: int = 0
    stored: int = 0            # new windows
    duplicates: int = 0        # windows and events already stored (re-delivered)
    events: int = 0            # new events
    statuses: int = 0
    dead_letters: int = 0
    foreign_streams: int = 0   # dead-lettered because they named another device's stream (also in dead_letters)
    lags: list[float] = field(default_factory=list)   # received_at - end of each new window (s)
    window_devices: set[tuple[str, str]] = field(default_factory=set)


@dataclass(frozen=True)
class StreamGap:
    """A stream whose stored seqs stop before its highest seq."""

    stream: str
    fleet: str
    device: str
    contiguous_seq: int
    max_seq: int
    last_resend_at: float | None
    device_state: str | None = None


def _safe_text(text: str, limit: int = 500) -> str:
    """Text that every database accepts: no NUL, no lone surrogates, bounded length."""
    text = text[:limit].replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _window_row(fleet: str, device: str, w: dict[str, Any], text: str, received_at: float) -> tuple:
    lat = w["latency_ms"]
    conf = w.get("confidence") or {}
    inp = w.get("input") or {}
    fb = w.get("feedback") or {}
    # int()/float(): JSON Schema counts 1.0 as an integer, and a BIGINT / DOUBLE column wants the exact type
    return (w["window_id"], fleet, device, w["stream"], int(w["seq"]), w["model"]["name"], w["model"]["version"],
            float(w["start"]), float(w["end"]), received_at, int(w["count"]), int(sum(w["errors"].values())),
            client_error_count(w),
            _real(lat.get("p50")), _real(lat.get("p95")), _real(lat.get("p99")), _real(conf.get("mean")),
            _real(inp.get("psi_max")), int(fb.get("labelled", 0)), int(fb.get("correct", 0)),
            int(w["dropped_windows"]), text)


def _real(x: float | int | None) -> float | None:
    """A JSON number for a DOUBLE PRECISION column (a huge integer would not bind as one)."""
    return None if x is None else float(x)


class _StreamCache(OrderedDict):
    """stream -> (contiguous, max) as last written by us (or -> (fleet, device), its owner); least recently used
    streams are forgotten beyond ``maxsize`` (a forgotten stream is read again from the ``streams`` table), so
    memory does not grow with every stream ever seen."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key: str, value: tuple) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)

    def update(self, other: dict[str, tuple]) -> None:  # type: ignore[override]
        for k, v in other.items():
            self[k] = v


class Ingestor:
    """Validates and stores batches of messages in a :class:`~edge_sdk.fleet.db.Database` (already migrated).

    ``retention`` (default: :meth:`RetentionPolicy.from_env`) is applied after a batch every
    ``retention.interval_s`` seconds, first one interval after start; ``False`` turns it off.
    """

    def __init__(self, db: Database, *, max_cached_streams: int = 10_000,
                 retention: RetentionPolicy | bool | None = None) -> None:
        self.db = db
        self._streams = _StreamCache(max_cached_streams)
        self._owners = _StreamCache(max_cached_streams)  # stream -> (fleet, device) that owns it (never changes)
        self.retention = RetentionPolicy.from_env() if retention is None or retention is True else retention or None
        self._next_retention = time.monotonic() + (self.retention.interval_s if self.retention else 0.0)
        pg = db.dialect == "postgresql"
        self._greatest = "GREATEST" if pg else "MAX"
        self._for_update = " FOR UPDATE" if pg else ""

    # -- batches ------------------------------------------------------------------------------------------------
    def store_batch(self, messages: Sequence[Message]) -> BatchResult:
        """Validate and store ``messages`` in one transaction (falls back to one by one if it fails)."""
        try:
            with self.db.transaction():
                result = self._store(messages)
            self._maybe_retain()
            return result
        except Exception as exc:  # any database refusal: retried per message below, nothing is lost
            self._streams.clear()  # the rolled-back transaction may have moved our cached stream state
            self._owners.clear()  # ... and may have rolled back streams rows we took as owned
            log.warning("batch of %d failed (%s: %s); storing one by one", len(messages), type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "")
        total = BatchResult()
        for m in messages:
            try:
                with self.db.transaction():
                    r = self._store([m])
            except Exception as exc:  # this message cannot be stored: dead-letter it with the cause
                self._streams.clear()
                self._owners.clear()
                reason = f"could not be stored: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                try:
                    with self.db.transaction():
                        self._dead(m, reason)
                except Exception as exc2:
                    raise StoreUnavailable(f"the database accepts nothing ({type(exc2).__name__}: {exc2}): "
                                           "check it is up and has space") from exc2
                r = BatchResult(received=1, dead_letters=1)
            _merge(total, r)
        return total

    def _maybe_retain(self) -> None:
        """Apply the retention policy when it is due; a failure is logged and tried again next interval."""
        if self.retention is None or time.monotonic() < self._next_retention:
            return
        self._next_retention = time.monotonic() + self.retention.interval_s
        try:
            done = apply_retention(self.db, self.retention)
        except Exception as exc:  # retention must never stop ingest
            log.warning("retention failed (%s: %s); retried in %g s", type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "", self.retention.interval_s)
            return
        finally:
            self._streams.clear()  # retention may have moved contiguous_seq
        if any(done.values()):
            log.info("retention: %s", ", ".join(f"{k} {v}" for k, v in done.items() if v))

    def _dead(self, m: Message, reason: str) -> None:
        payload = bytes(m.payload[:MAX_PAYLOAD_BYTES]) if isinstance(m.payload, (bytes, bytearray)) else b""
        self.db.execute(_INSERT_DEAD, (m.received_at, _safe_text(str(m.topic)), _safe_text(reason), payload))

    def _store(self, messages: Sequence[Message]) -> BatchResult:
        r = BatchResult(received=len(messages))
        windows: list[tuple] = []
        window_meta: list[tuple[str, str, str, int, float, float]] = []
        events: list[tuple] = []
        unavailable: list[tuple[str, str, str]] = []
        dead: list[tuple] = []
        touch: dict[tuple[str, str], list] = {}
        statuses: dict[tuple[str, str], list[tuple]] = {}
        valid: list[tuple[Message, str, str, str, dict[str, Any]]] = []
        for m in messages:
            try:
                fleet, device, kind, obj = validate_message(m.topic, m.payload)
            except PayloadError as exc:
                payload = bytes(m.payload[:MAX_PAYLOAD_BYTES]) if isinstance(m.payload, (bytes, bytearray)) else b""
                dead.append((m.received_at, _safe_text(str(m.topic)), _safe_text(exc.reason), payload))
                parsed = parse_topic(m.topic) if isinstance(m.topic, str) else None
                if parsed:
                    _touch(touch, parsed[0], parsed[1], m.received_at, None)
                continue
            valid.append((m, fleet, device, kind, obj))
        owners = self._stream_owners(valid)
        for m, fleet, device, kind, obj in valid:
            named = stream_of(kind, obj)
            if named is not None and owners.get(named[1], (fleet, device)) != (fleet, device):
                reason = (f"field {named[0]}: stream {named[1]} belongs to device {'/'.join(owners[named[1]])}, "
                          f"not {fleet}/{device}: a device may write only its own outbox streams")
                dead.append((m.received_at, _safe_text(str(m.topic)), _safe_text(reason), bytes(m.payload)))
                r.foreign_streams += 1
                _touch(touch, fleet, device, m.received_at, None)
                continue
            if kind == "telemetry":
                windows.append(_window_row(fleet, device, obj, bytes(m.payload).decode("utf-8"), m.received_at))
                window_meta.append((fleet, device, obj["stream"], int(obj["seq"]), float(obj["end"]), m.received_at))
                fresh = m.received_at - obj["end"] <= max(3 * (obj["end"] - obj["start"]), 30.0)
                _touch(touch, fleet, device, m.received_at, obj["model"] if fresh else None)
            elif kind == "events":
                events.append((obj["event_id"], fleet, device, float(obj["ts"]), m.received_at, obj["kind"],
                               obj.get("level", "info"), json.dumps(obj["data"], separators=(",", ":"))))
                if obj["kind"] == "resend.unavailable":
                    unavailable.append((fleet, device, obj["data"]["stream"]))
                _touch(touch, fleet, device, m.received_at, None)
            else:
                model = obj.get("model") or {}
                statuses.setdefault((fleet, device), []).append((
                    # a last will carries the time the device connected, not when it vanished: use the arrival
                    fleet, device, obj["state"],
                    max(float(obj["ts"]), m.received_at) if obj.get("reason") == "last will" else float(obj["ts"]),
                    obj.get("reason"), m.received_at, m.received_at,
                    model.get("name"), model.get("version"), model.get("artifact"), model.get("runtime"),
                    obj.get("agent_version"), _real(obj.get("window_s"))))
                r.statuses += 1
        if dead:
            self.db.executemany(_INSERT_DEAD, dead)
            r.dead_letters = len(dead)
            if r.foreign_streams:
                log.warning("dead-lettered %d message(s) naming another device's stream", r.foreign_streams)
        if windows:
            new = self.db.executemany(_INSERT_WINDOW, windows)
            r.stored = new
            r.duplicates += len(windows) - new
            r.lags = [received - end for *_, end, received in window_meta]
            self._update_streams(window_meta)
            r.window_devices = {(f, d) for f, d, *_ in window_meta}
        if events:
            new = self.db.executemany(_INSERT_EVENT, events)
            r.events = new
            r.duplicates += len(events) - new
            for fleet, device, stream in unavailable:
                self.advance(stream, fleet=fleet, device=device)
        # device rows last, in key order: two collectors (both get every status) lock them in the same order;
        # consecutive statements of one kind go to the database as one executemany
        steps: list[tuple[str, tuple]] = []
        for key in sorted(set(statuses) | set(touch)):
            steps.extend((_UPSERT_STATUS, params) for params in statuses.get(key, ()))
            if key in touch:
                t, model = touch[key]
                steps.append((_TOUCH_DEVICE, (*key, t, t, *(model.get(k) for k in
                                                            ("name", "version", "artifact", "runtime")))))
        i = 0
        while i < len(steps):
            j = i
            while j < len(steps) and steps[j][0] is steps[i][0]:
                j += 1
            self.db.executemany(steps[i][0], [params for _, params in steps[i:j]])
            i = j
        return r

    # -- streams ------------------------------------------------------------------------------------------------
    def _stream_owners(self, valid: list[tuple[Message, str, str, str, dict[str, Any]]]
                       ) -> dict[str, tuple[str, str]]:
        """(fleet, device) owning each stream the batch names. The first message naming an unowned stream claims
        it: its ``streams`` row is inserted now, in stream order, inside the batch's transaction (a second
        collector's claim waits for ours, then reads our row)."""
        claims: dict[str, tuple[str, str]] = {}
        for _m, fleet, device, kind, obj in valid:
            named = stream_of(kind, obj)
            if named is not None:
                claims.setdefault(named[1], (fleet, device))
        owners = {st: self._owners.get(st) for st in claims}
        unknown = sorted(st for st, owner in owners.items() if owner is None)
        if unknown:
            now = time.time()
            self.db.executemany("INSERT INTO streams (stream, fleet, device, contiguous_seq, max_seq, updated_at) "
                                "VALUES (?, ?, ?, 0, 0, ?) ON CONFLICT (stream) DO NOTHING",
                                [(st, *claims[st], now) for st in unknown])
            for i in range(0, len(unknown), 500):
                chunk = unknown[i:i + 500]
                for row in self.db.query(f"SELECT stream, fleet, device FROM streams WHERE stream IN "
                                         f"({', '.join('?' * len(chunk))})", chunk):
                    owners[row["stream"]] = self._owners[row["stream"]] = (row["fleet"], row["device"])
        return owners  # type: ignore[return-value]

    def _update_streams(self, meta: list[tuple[str, str, str, int, float, float]]) -> None:
        by_stream: dict[str, tuple[str, str, set[int]]] = {}
        for fleet, device, stream, seq, _end, _rec in meta:
            by_stream.setdefault(stream, (fleet, device, set()))[2].add(seq)
        now = time.time()
        streams = sorted(by_stream)
        if self._for_update:  # PostgreSQL: lock every stream row of the batch at once, in one order for all collectors
            for i in range(0, len(streams), 500):
                chunk = streams[i:i + 500]
                self.db.query(f"SELECT stream FROM streams WHERE stream IN ({', '.join('?' * len(chunk))}) "
                              "ORDER BY stream FOR UPDATE", chunk)
        fast: list[tuple] = []
        fast_state: dict[str, tuple[str, str, int]] = {}
        slow: list[tuple[str, str, str, int]] = []
        for stream in streams:
            fleet, device, seqs = by_stream[stream]
            state = self._streams.get(stream)
            if state is None:
                state = self._load_stream(stream, fleet, device, now)
            c, m = state
            above = sorted(s for s in seqs if s > c)
            if not above:
                continue
            k = len(above)
            if above[-1] == c + k and m <= c + k:  # in order and nothing stored beyond: no need to look
                fast.append((c + k, c + k, now, stream, c))
                fast_state[stream] = (fleet, device, c + k)
            else:
                slow.append((stream, fleet, device, above[-1]))
        if fast:
            changed = self.db.executemany(
                f"UPDATE streams SET contiguous_seq = ?, max_seq = {self._greatest}(max_seq, ?), updated_at = ? "
                "WHERE stream = ? AND contiguous_seq = ?", fast)
            if changed == len(fast):
                self._streams.update({st: (n, n) for st, (_f, _d, n) in fast_state.items()})
            else:  # another collector moved some of them: recompute those from the table
                for st, (f, d, n) in fast_state.items():
                    self._streams.pop(st, None)
                    slow.append((st, f, d, n))
        for stream, fleet, device, seen_max in sorted(slow):
            self.advance(stream, fleet=fleet, device=device, seen_max=seen_max)

    def _load_stream(self, stream: str, fleet: str, device: str, now: float) -> tuple[int, int]:
        rows = self.db.query("SELECT contiguous_seq, max_seq FROM streams WHERE stream = ?", (stream,))
        if not rows:
            self.db.execute("INSERT INTO streams (stream, fleet, device, contiguous_seq, max_seq, updated_at) "
                            "VALUES (?, ?, ?, 0, 0, ?) ON CONFLICT (stream) DO NOTHING", (stream, fleet, device, now))
            rows = self.db.query("SELECT contiguous_seq, max_seq FROM streams WHERE stream = ?", (stream,))
        state = (int(rows[0]["contiguous_seq"]), int(rows[0]["max_seq"]))
        self._streams[stream] = state
        return state

    def advance(self, stream: str, *, fleet: str | None = None, device: str | None = None,
                seen_max: int = 0) -> tuple[int, int]:
        """Recompute ``contiguous_seq`` of ``stream`` from the stored windows and declared-lost seqs.

        Joins the caller's transaction or runs in its own; returns ``(contiguous_seq, max_seq)``.
        """
        with self.db.transaction():
            rows = self.db.query("SELECT fleet, device, contiguous_seq, max_seq FROM streams WHERE stream = ?"
                                 + self._for_update, (stream,))
            if not rows:
                if fleet is None or device is None:
                    return (0, 0)
                self._load_stream(stream, fleet, device, time.time())
                rows = self.db.query("SELECT fleet, device, contiguous_seq, max_seq FROM streams WHERE stream = ?"
                                     + self._for_update, (stream,))
            row = rows[0]
            c, m = int(row["contiguous_seq"]), max(int(row["max_seq"]), seen_max)
            stored = {r["seq"] for r in self.db.query(
                "SELECT seq FROM windows WHERE stream = ? AND seq > ? ORDER BY seq LIMIT 200000", (stream, c))}
            if stored:
                m = max(m, max(stored))
            nxt, lost = c + 1, 0
            while nxt in stored:
                nxt += 1
            if nxt <= m:
                lost_ranges = self._lost_ranges(stream, row["fleet"], row["device"])
                while nxt <= m:
                    if nxt in stored:
                        nxt += 1
                    elif any(a <= nxt <= b for a, b in lost_ranges):
                        lost += 1
                        nxt += 1
                    else:
                        break
            new_c = nxt - 1
            self.db.execute(
                f"UPDATE streams SET contiguous_seq = ?, max_seq = {self._greatest}(max_seq, ?), lost = lost + ?, "
                "updated_at = ? WHERE stream = ?", (new_c, m, lost, time.time(), stream))
            self._streams[stream] = (new_c, m)
            return new_c, m

    def _lost_ranges(self, stream: str, fleet: str, device: str) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for r in self.db.query("SELECT data FROM events WHERE fleet = ? AND device = ? AND kind = ?",
                               (fleet, device, "resend.unavailable")):
            data = json.loads(r["data"])
            if data.get("stream") == stream:
                out.extend((int(a), int(b)) for a, b in data.get("ranges", []))
        return out

    def gaps(self) -> list[StreamGap]:
        """Every stream whose ``contiguous_seq`` is below its ``max_seq``."""
        return [StreamGap(r["stream"], r["fleet"], r["device"], int(r["contiguous_seq"]), int(r["max_seq"]),
                          r["last_resend_at"], r["state"])
                for r in self.db.query(
                    "SELECT s.stream, s.fleet, s.device, s.contiguous_seq, s.max_seq, s.last_resend_at, d.state "
                    "FROM streams s LEFT JOIN devices d ON d.fleet = s.fleet AND d.device = s.device "
                    "WHERE s.contiguous_seq < s.max_seq")]

    def missing_ranges(self, stream: str, contiguous: int, max_seq: int, *, max_ranges: int = 100,
                       max_seqs: int = 5000) -> list[tuple[int, int]]:
        """Inclusive ``(first, last)`` seq ranges of ``stream`` above ``contiguous`` that are not stored, oldest
        first, at most ``max_ranges`` ranges and ``max_seqs`` seqs in all."""
        stored = [r["seq"] for r in self.db.query(
            "SELECT seq FROM windows WHERE stream = ? AND seq > ? AND seq <= ? ORDER BY seq",
            (stream, contiguous, max_seq))]
        ranges: list[tuple[int, int]] = []
        budget = max_seqs
        nxt = contiguous + 1
        for s in [*stored, max_seq + 1]:
            if s > nxt and budget > 0 and len(ranges) < max_ranges:
                last = min(s - 1, nxt + budget - 1)
                ranges.append((nxt, last))
                budget -= last - nxt + 1
            nxt = max(nxt, s + 1)
        return ranges

    def claim_resend(self, stream: str, now: float, interval_s: float) -> bool:
        """Record a resend request for ``stream`` unless one was made less than ``interval_s`` ago (by any
        collector); True when this caller should send it."""
        return self.db.execute(
            "UPDATE streams SET resend_requests = resend_requests + 1, last_resend_at = ? "
            "WHERE stream = ? AND (last_resend_at IS NULL OR last_resend_at <= ?)",
            (now, stream, now - interval_s)) == 1


def _touch(touch: dict[tuple[str, str], list], fleet: str, device: str, at: float, model: dict | None) -> None:
    cur = touch.get((fleet, device))
    if cur is None:
        touch[(fleet, device)] = [at, dict(model or {})]
    else:
        cur[0] = max(cur[0], at)
        if model:
            cur[1] = dict(model)


def _merge(total: BatchResult, r: BatchResult) -> None:
    for name in ("received", "stored", "duplicates", "events", "statuses", "dead_letters", "foreign_streams"):
        setattr(total, name, getattr(total, name) + getattr(r, name))
    total.lags.extend(r.lags)
    total.window_devices |= r.window_devices
