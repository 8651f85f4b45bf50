"""Acceptance 6: 10,000 fuzzed payloads (hypothesis) through validation and the collector's storing path
(and 1,000 more through the pure-Python validation backend).

Valid windows, events and statuses are mutated (missing keys, wrong types, huge numbers, NaN/Infinity text,
nested junk, truncation, random bytes, wrong topics). An independent oracle (the ``jsonschema`` library on the
same schemas plus the documented extra rules) says which ones are valid. Every example goes through
``validate_message`` (only PayloadError may come out) and then, in batches, through the collector's
``Ingestor.store_batch`` on a real SQLite database: every invalid one must be in ``dead_letters`` with a
reason, every valid one stored.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from collector_helpers import event, payload_bytes, status, window
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_sdk.fleet.collector.ingest import Ingestor, Message
from edge_sdk.fleet.collector.validate import (
    MAX_PAYLOAD_BYTES,
    SCHEMA_DIR,
    PayloadError,
    schema_backend,
    validate_message,
)
from edge_sdk.fleet.db import Database

jsonschema = pytest.importorskip("jsonschema")

FLEET, DEVICES = "fz", ("cam1", "cam2")
_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _whole(node: Any) -> Any:
    """The documented rule "patterns match whole strings": ``$`` -> ``\\Z`` for Python's re.search."""
    if isinstance(node, dict):
        out = {k: _whole(v) for k, v in node.items()}
        if isinstance(out.get("pattern"), str) and out["pattern"].endswith("$"):
            out["pattern"] = out["pattern"][:-1] + "\\Z"
        return out
    return [_whole(x) for x in node] if isinstance(node, list) else node


_SCHEMAS = {kind: jsonschema.Draft202012Validator(_whole(json.loads((SCHEMA_DIR / f).read_text())))
            for kind, f in (("telemetry", "telemetry.schema.json"), ("events", "event.schema.json"),
                            ("status", "status.schema.json"))}


def _bases() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for i, dev in enumerate(DEVICES * 4):
        w = window(FLEET, dev, seq=i + 1, latency_ms=[1.0 + j for j in range(i + 1)], conf_mean=0.1 * (i % 9) or None,
                   psi=None if i % 3 == 0 else 0.05 * i, errors={"input": i} if i % 2 else None, channels=1 + i % 3)
        w["feedback"] = {"labelled": i, "correct": i // 2} if i % 2 else None
        out.append(("telemetry", w))
    out += [("events", event(FLEET, d, k, data)) for d in DEVICES for k, data in (
        ("model.loaded", {"artifact": "onnx/fp32"}),
        ("resend.unavailable", {"stream": uuid.uuid4().hex, "ranges": [[1, 3], [7, 7]]}))]
    out += [("status", status(FLEET, d, s)) for d in DEVICES for s in ("online", "offline")]
    return out


BASES = _bases()
JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(min_value=10**17, max_value=10**40), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), st.lists(st.integers(min_value=-5, max_value=5), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(min_value=-5, max_value=5), max_size=3),
    st.recursive(st.integers(), lambda c: st.lists(c, max_size=2) | st.dictionaries(st.text(max_size=2), c,
                                                                                     max_size=2), max_leaves=6))


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += _paths(v, (*prefix, i))
    return out


def _parent(obj: Any, path: tuple) -> Any:
    for p in path[:-1]:
        obj = obj[p]
    return obj


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, bytes]:
    kind, base = draw(st.sampled_from(BASES))
    obj = copy.deepcopy(base)
    if "window_id" in obj:
        obj["window_id"] = uuid.uuid4().hex
    if "event_id" in obj:
        obj["event_id"] = uuid.uuid4().hex
    topic = f"edge/{FLEET}/{obj['device']}/{kind}"
    how = draw(st.sampled_from(["valid", "set", "delete", "add", "text", "bytes", "topic", "nested", "huge",
                                "json", "set", "delete", "set"]))
    if how in ("set", "delete", "add"):
        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            paths = _paths(obj)
            if not paths:
                break
            path = draw(st.sampled_from(paths))
            parent = _parent(obj, path)
            if how == "set":
                parent[path[-1]] = draw(JUNK)
            elif how == "delete":
                del parent[path[-1]]
            elif isinstance(parent, dict):
                parent[draw(st.text(min_size=1, max_size=8))] = draw(JUNK)
    elif how == "nested":
        depth = draw(st.sampled_from([10, 200, 5000]))
        target = obj.setdefault("extra", {}) if kind == "telemetry" else obj
        target["junk"] = json.loads("[" * depth + "]" * depth) if depth < 900 else "placeholder"
        if depth >= 900:
            return topic, payload_bytes(obj).replace(b'"placeholder"', b"[" * depth + b"]" * depth)
    elif how == "huge":
        return topic, payload_bytes({**obj, "extra": {"pad": "x" * (MAX_PAYLOAD_BYTES + 10)}})
    data = payload_bytes(obj)
    if how == "text":
        numbers = [m.span() for m in re.finditer(rb"(?<=[:\[,])-?[0-9][0-9.eE+-]*", data)]
        if numbers and draw(st.booleans()):
            a, b = draw(st.sampled_from(numbers))
            data = data[:a] + draw(st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"1" * 30,
                                                    b"-0.0", b"1E+2", b"true", b'"7"'])) + data[b:]
        else:
            cut = draw(st.integers(min_value=0, max_value=len(data)))
            data = data[:cut] + draw(st.binary(max_size=6)) + data[cut + draw(st.integers(0, 3)):]
    elif how == "bytes":
        data = draw(st.binary(max_size=300))
    elif how == "json":
        data = json.dumps(draw(st.recursive(st.none() | st.integers() | st.text(max_size=5),
                                            lambda c: st.lists(c, max_size=3) | st.dictionaries(
                                                st.text(max_size=4), c, max_size=3), max_leaves=8))).encode()
    elif how == "topic":
        topic = draw(st.sampled_from([
            f"edge/{FLEET}/other/{kind}", f"edge/other/{obj.get('device')}/{kind}", f"edge/{FLEET}/{obj['device']}",
            f"edge/{FLEET}/{obj['device']}/{'status' if kind != 'status' else 'telemetry'}",
            f"edge/{FLEET}/{obj['device']}/cmd/resend", "edge/+/x/telemetry", ""]) | st.text(max_size=30))
    return topic, data


def _finite(obj: Any) -> bool:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, (int, float)) and not isinstance(x, bool) and not -(2**63) <= x <= 2**63 - 1:
            return False  # documented rule: every number within the 64-bit integer range (NaN fails too)
        if isinstance(x, str):
            if "\x00" in x:
                return False  # documented rule: no NUL characters in strings
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return False
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return True


def oracle(topic: str, payload: bytes) -> bool:
    """Independent statement of what the collector accepts (jsonschema + the documented extra rules)."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "edge" or parts[3] not in _SCHEMAS or not all(map(_ID.match, parts[1:3])):
        return False
    if len(payload) > MAX_PAYLOAD_BYTES:
        return False
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=lambda c: float("nan"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    if not isinstance(obj, dict) or not _finite(obj) or not _SCHEMAS[parts[3]].is_valid(obj):
        return False
    if (obj["fleet"], obj["device"]) != (parts[1], parts[2]):
        return False
    if parts[3] == "telemetry":
        sk = obj["latency_ms"]["sketch"]
        if obj["end"] < obj["start"] or not math.isclose(sum(sk["bins"].values()) + sk["zero_count"], sk["count"],
                                                         rel_tol=1e-6, abs_tol=1e-6):
            return False
        g = math.log((1 + sk["relative_accuracy"]) / (1 - sk["relative_accuracy"]))
        if any(abs(int(k) * g) > math.log(1e9) + g for k in sk["bins"]):
            return False
    if parts[3] == "events" and obj["kind"] == "resend.unavailable":
        d, r = obj["data"], obj["data"].get("ranges")
        if not (isinstance(d.get("stream"), str) and re.fullmatch(r"[0-9a-f]{32}", d["stream"])
                and isinstance(r, list) and 0 < len(r) <= 1000
                and all(isinstance(x, list) and len(x) == 2 and all(type(v) is int and v >= 1 for v in x)
                        and x[1] >= x[0] for x in r)):
            return False
    return True


@pytest.fixture(params=[("jsonschema-rs", 10_000), ("fastjsonschema", 1_000)], ids=lambda p: p[0])
def backend(request: pytest.FixtureRequest) -> Iterator[int]:
    """Both validation backends: the collector's default (10,000 examples) and the pure-Python fallback."""
    name, examples = request.param
    if name == "jsonschema-rs":
        pytest.importorskip("jsonschema_rs")
        pytest.importorskip("orjson")
    before = schema_backend()
    schema_backend(name)
    yield examples
    schema_backend(before)


def test_fuzzed_payloads_never_crash_and_every_bad_one_is_dead_lettered(tmp_path: Path, backend: int) -> None:
    seen: list[tuple[str, bytes, bool]] = []

    @settings(max_examples=backend, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(messages())
    def one(msg: tuple[str, bytes]) -> None:
        topic, payload = msg
        try:
            validate_message(topic, payload)
            accepted = True
        except PayloadError as exc:
            assert exc.reason and "\n" not in exc.reason
            accepted = False
        assert accepted == oracle(topic, payload), (topic, payload[:300])
        seen.append((topic, payload, accepted))

    one()
    assert len(seen) >= backend
    kinds = Counter(accepted for *_, accepted in seen)
    assert kinds[True] > backend // 30 and kinds[False] > backend // 2, kinds  # both sides are exercised

    db = Database.connect(f"sqlite:///{tmp_path / 'fleet.db'}")
    db.migrate()
    ingestor = Ingestor(db)
    for i in range(0, len(seen), 250):  # the collector's own batches: valid and invalid messages mixed
        ingestor.store_batch([Message(t, p, time.time()) for t, p, _ in seen[i:i + 250]])
    dead = db.query("SELECT reason, payload FROM dead_letters")
    assert all(r["reason"].strip() for r in dead)
    expected_dead = Counter(p[:MAX_PAYLOAD_BYTES] for _, p, ok in seen if not ok)
    assert Counter(bytes(r["payload"]) for r in dead) == expected_dead
    window_ids = {r["window_id"] for r in db.query("SELECT window_id FROM windows")}
    stream_seqs = {(r["stream"], int(r["seq"])) for r in db.query("SELECT stream, seq FROM windows")}
    event_ids = {r["event_id"] for r in db.query("SELECT event_id FROM events")}
    devices = {(r["fleet"], r["device"]) for r in db.query("SELECT fleet, device FROM devices WHERE state <> ?",
                                                           ("unknown",))}
    for topic, payload, ok in seen:
        if not ok:
            continue
        obj = json.loads(payload)
        kind = topic.rsplit("/", 1)[1]
        if kind == "telemetry":
            # one window per (stream, seq) since migration 0003: a second one with another window_id is a duplicate
            assert obj["window_id"] in window_ids or (obj["stream"], int(obj["seq"])) in stream_seqs
        elif kind == "events":
            assert obj["event_id"] in event_ids
        else:
            assert (obj["fleet"], obj["device"]) in devices
    db.close()
