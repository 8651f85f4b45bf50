"""Helpers of the collector tests: schema-valid device payloads (built like an agent builds them), a throwaway
PostgreSQL database, and a plain paho MQTT v5 client that publishes and records what it receives."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from edge_sdk.sketch import new_sketch, quantiles, sketch_to_dict

__all__ = ["MQTT_URL", "PG_ADMIN_URL", "MqttPeer", "event", "payload_bytes", "pg_url", "status", "wait_until",
           "window"]

MQTT_URL = "mqtt://127.0.0.1:1883"
PG_ADMIN_URL = os.environ.get("EDGE_TEST_PG_ADMIN", "postgresql://root@127.0.0.1:5432/test")


def window(fleet: str, device: str, *, seq: int = 1, stream: str | None = None, count: int = 50,
           latency_ms: float | list[float] = 5.0, errors: dict[str, int] | None = None,
           conf_mean: float | None = 0.8, psi: float | None = 0.01, end: float | None = None,
           window_s: float = 10.0, model: tuple[str, str] = ("net", "1.0"), channels: int = 3,
           channel_counts: list[int] | None = None) -> dict[str, Any]:
    """One schema-valid telemetry window; latencies are ``count`` copies of ``latency_ms`` (or the list given);
    each input channel's histogram is ``channel_counts`` (default: everything in the first of 20 bins)."""
    sketch = new_sketch()
    values = latency_ms if isinstance(latency_ms, list) else [latency_ms] * count
    for v in values:
        sketch.add(v)
    q = quantiles(sketch)
    end = time.time() if end is None else end
    w: dict[str, Any] = {
        "schema": "edge-sdk/telemetry-window", "schema_version": "1.0",
        "window_id": uuid.uuid4().hex, "stream": stream or uuid.uuid4().hex, "seq": seq,
        "fleet": fleet, "device": device,
        "model": {"name": model[0], "version": model[1], "artifact": "onnx/fp32", "runtime": "onnxruntime"},
        "start": end - window_s, "end": end, "count": len(values), "errors": dict(errors or {}),
        "latency_ms": {"p50": q["p50"], "p95": q["p95"], "p99": q["p99"], "max": max(values) if values else None,
                       "mean": sum(values) / len(values) if values else None, "sketch": sketch_to_dict(sketch)},
        "confidence": None, "classes": None, "input": None, "feedback": None,
        "health": {"cpu_temp_c": 51.0, "load1": 0.5, "cpu_count": 4, "mem_used_frac": 0.4, "rss_mb": 120.0,
                   "disk_free_frac": 0.7, "uptime_s": 100.0},
        "dropped_windows": 0,
    }
    if conf_mean is not None:
        counts = [0] * 10
        counts[min(int(conf_mean * 10), 9)] = len(values)
        w["confidence"] = {"bin_edges": [i / 10 for i in range(11)], "counts": counts, "mean": conf_mean}
        w["classes"] = {"0": len(values)}
    if psi is not None:
        w["input"] = {"sampled": len(values), "psi_max": psi,
                      "channels": [{"mean": 0.0, "std": 1.0, "psi": psi,
                                    "counts": list(channel_counts or [len(values)] + [0] * 19)}
                                   for _ in range(channels)]}
    return w


def event(fleet: str, device: str, kind: str = "model.loaded", data: dict | None = None,
          level: str = "info") -> dict[str, Any]:
    """One schema-valid event."""
    return {"schema": "edge-sdk/event", "schema_version": "1.0", "event_id": uuid.uuid4().hex, "fleet": fleet,
            "device": device, "ts": time.time(), "kind": kind, "level": level, "data": dict(data or {})}


def status(fleet: str, device: str, state: str = "online", *, ts: float | None = None, window_s: float = 10.0,
           model: tuple[str, str] = ("net", "1.0")) -> dict[str, Any]:
    """One schema-valid status (birth or last will)."""
    return {"schema": "edge-sdk/status", "schema_version": "1.0", "fleet": fleet, "device": device, "state": state,
            "reason": None if state == "online" else "last will", "ts": time.time() if ts is None else ts,
            "model": {"name": model[0], "version": model[1], "artifact": "onnx/fp32", "runtime": "onnxruntime"},
            "agent_version": "0.1", "window_s": window_s}


def payload_bytes(obj: dict[str, Any]) -> bytes:
    """Compact JSON bytes as a device sends them."""
    return json.dumps(obj, separators=(",", ":")).encode()


def wait_until(condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> bool:
    """:func:`mqtt_helpers.wait_until` with the collector tests' longer default timeout."""
    from mqtt_helpers import wait_until as _wait_until

    return _wait_until(condition, timeout, interval)


@contextlib.contextmanager
def pg_url(prefix: str = "edge_test") -> Iterator[str]:
    """URL of a new, empty PostgreSQL database ``<prefix>_<hex>`` (created on the admin connection, dropped after)."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class MqttPeer:
    """A plain paho MQTT v5 client on the test broker: QoS 1 publishes, and records messages of ``subscribe``."""

    def __init__(self, url: str = MQTT_URL, subscribe: list[str] | None = None, *, v5: bool = True) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        host, port = url.split("://", 1)[1].split(":")
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"peer-{uuid.uuid4().hex[:12]}",
                                  protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        self.client.max_inflight_messages_set(200)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(host, int(port))
        self.client.loop_start()
        if subscribe:
            self.client.subscribe([(t, 1) for t in subscribe])
            if not self._subscribed.wait(10):
                raise TimeoutError("no SUBACK from the test broker")

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    def received(self, topic: str) -> list[dict[str, Any]]:
        """Payloads (parsed JSON) received on ``topic``."""
        with self._lock:
            return [json.loads(p) for t, p in self.messages if t == topic]

    def publish(self, topic: str, payload: bytes | dict, *, retain: bool = False) -> None:
        """Publish with QoS 1 and wait for the broker's PUBACK."""
        data = payload_bytes(payload) if isinstance(payload, dict) else payload
        self.client.publish(topic, data, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()
