"""The MQTT publisher against real brokers: order and QoS 1, broker restarts, status birth / last will, commands,
resend, TLS, MQTT 3.1.1 fallback (embedded amqtt), an unreachable broker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from mqtt_helpers import (
    SYSTEM_BROKER,
    Subscriber,
    free_port,
    mosquitto,  # noqa: F401  (fixture)
    own_mosquitto,
    require_system_broker,
    seqs,
    unique_fleet,
    wait_until,
    window,
)

from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher
from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.errors import TelemetryError
from edge_sdk.testing.broker import MosquittoProcess, start_embedded_broker


def _validator(name: str) -> Any:
    import fastjsonschema

    schema = json.loads((Path(__file__).resolve().parent.parent / "edge_sdk" / "schemas" / f"{name}.schema.json")
                        .read_text())
    return fastjsonschema.compile(schema)


def _publisher(url: str, fleet: str, outbox: Outbox, device: str = "dev1", **kwargs: Any) -> Publisher:
    on_command = kwargs.pop("on_command", None)
    settings = MqttSettings(url, fleet, device, client_id=f"edge-{fleet}-{device}-{uuid.uuid4().hex[:6]}", **kwargs)
    return Publisher(settings, outbox, model={"name": "m", "version": "1"}, window_s=10.0, on_command=on_command)


def _command(name: str, **fields: Any) -> bytes:
    return json.dumps({"schema": "edge-sdk/command", "schema_version": "1.0", "command": name,
                       "command_id": uuid.uuid4().hex, "ts": time.time(), **fields}).encode()


def test_windows_arrive_in_order_with_qos1_and_retained_birth(tmp_path: Path) -> None:
    require_system_broker()
    fleet = unique_fleet()
    n = 500
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/#") as sub, Outbox(tmp_path / "o.db") as ob:
        ob.put_many([(f"edge/{fleet}/dev1/telemetry", window(i), True) for i in range(n)])
        pub = _publisher(SYSTEM_BROKER, fleet, ob)
        pub.start()
        try:
            assert pub.flush(30)
            got = sub.wait_for(n, f"edge/{fleet}/dev1/telemetry", timeout=20)
            assert seqs([m.json() for m in got]) == list(range(1, n + 1))
            assert {m.qos for m in got} == {1}
            assert pub.stats()["acked"] == n and ob.stats()["acked_kept"] == n and ob.stats()["pending"] == 0
            # a late subscriber gets the retained birth, valid against status.schema.json
            with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/dev1/status") as late:
                (status,) = late.wait_for(1, timeout=5)
            assert status.retain and status.json()["state"] == "online"
            _validator("status")(status.json())
        finally:
            pub.stop()
        with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/dev1/status") as late:
            (status,) = late.wait_for(1, timeout=5)
        assert status.retain and status.json()["state"] == "offline" and status.json()["reason"] == "shutdown"
        _clear_retained(f"edge/{fleet}/dev1/status")


def _send(url: str, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """Publish one QoS 1 message and wait for its PUBACK (a command from the operator / collector side)."""
    from paho.mqtt import client as mqtt
    from paho.mqtt import publish

    host, port = url.split("://")[1].split(":")
    publish.single(topic, payload, qos=1, retain=retain, hostname=host, port=int(port), protocol=mqtt.MQTTv5,
                   client_id=f"op-{uuid.uuid4().hex[:8]}")


def _clear_retained(topic: str, url: str = SYSTEM_BROKER) -> None:
    _send(url, topic, b"", retain=True)


def _writer(ob: Outbox, pub: Publisher, topic: str, n: int, stop: threading.Event, every_s: float = 0.0) -> None:
    for i in range(n):
        if stop.is_set():
            return
        ob.put(topic, window(i), sequenced=True)
        pub.wakeup()
        if every_s:
            time.sleep(every_s)


def test_broker_restarts_while_publishing_lose_nothing(mosquitto: MosquittoProcess, tmp_path: Path) -> None:  # noqa: F811
    fleet = unique_fleet()
    topic = f"edge/{fleet}/dev1/telemetry"
    n, restarts = 3000, 3
    # a persistent subscriber session: the broker keeps (and saves on a clean stop) what it could not deliver yet
    sub = Subscriber(mosquitto.url, topic, client_id=f"col-{fleet}", clean_start=False, session_expiry_s=3600)
    with Outbox(tmp_path / "o.db", synchronous="NORMAL") as ob:
        pub = _publisher(mosquitto.url, fleet, ob)
        pub.start()
        stop = threading.Event()
        writer = threading.Thread(target=_writer, args=(ob, pub, topic, n, stop, 0.002))
        writer.start()
        at_restart = []
        try:
            for k in range(restarts):
                assert wait_until(lambda k=k: pub.stats()["connects"] == k + 1, 15)  # connected again
                time.sleep(0.2)
                at_restart.append(ob.stats()["next_seq"] - 1)
                mosquitto.restart()  # SIGTERM (saves its queue) and start again on the same port
            writer.join(60)
            assert max(at_restart) < n  # every restart happened mid-stream
            assert pub.flush(60), pub.stats()
            wait_until(lambda: set(seqs(sub.payloads(topic))) >= set(range(1, n + 1)), 30)
            got = seqs(sub.payloads(topic))
            assert set(range(1, n + 1)) - set(got) == set()
            assert wait_until(lambda: pub.stats()["connects"] == restarts + 1, 15)
        finally:
            stop.set()
            pub.stop()
            sub.close()


def test_broker_kill_9_gaps_are_repaired_with_cmd_resend(mosquitto: MosquittoProcess, tmp_path: Path) -> None:  # noqa: F811
    fleet = unique_fleet()
    topic = f"edge/{fleet}/dev1/telemetry"
    n = 2000
    sub = Subscriber(mosquitto.url, [topic, f"edge/{fleet}/dev1/events"], client_id=f"col-{fleet}",
                     clean_start=False, session_expiry_s=3600)
    with Outbox(tmp_path / "o.db", synchronous="NORMAL") as ob:
        pub = _publisher(mosquitto.url, fleet, ob)
        pub.start()
        stop = threading.Event()
        writer = threading.Thread(target=_writer, args=(ob, pub, topic, n, stop, 0.002))
        writer.start()
        try:
            for k in range(3):
                assert wait_until(lambda k=k: pub.stats()["connects"] == k + 1, 15)
                time.sleep(0.3)
                mosquitto.restart(kill=True)  # whatever the broker had acked but not delivered is gone
            writer.join(60)
            assert pub.flush(60)
            wait_until(lambda: len(set(seqs(sub.payloads(topic)))) == n, 5)
            missing = sorted(set(range(1, n + 1)) - set(seqs(sub.payloads(topic))))
            # the collector's gap repair: ask the device for what it did not get (up to 100 ranges per command),
            # plus a range that never existed. (The killed broker forgot the device's session: a command sent
            # before the device subscribed again would be lost; a collector repeats unanswered requests.)
            assert wait_until(lambda: pub.stats()["subscribed"], 10)
            stream = ob.stream
            chunks = [[[s, s] for s in missing[i:i + 99]] for i in range(0, len(missing), 99)] or [[]]
            chunks[-1].append([n + 10, n + 12])
            for ranges in chunks:
                _send(mosquitto.url, f"edge/{fleet}/dev1/cmd/resend", _command("resend", stream=stream, ranges=ranges))
            assert wait_until(lambda: any(e.get("kind") == "resend.unavailable"
                                          for e in sub.payloads(f"edge/{fleet}/dev1/events")), 15)
            assert wait_until(lambda: set(seqs(sub.payloads(topic))) >= set(range(1, n + 1)), 15)
            event = next(e for e in sub.payloads(f"edge/{fleet}/dev1/events") if e["kind"] == "resend.unavailable")
            _validator("event")(event)
            assert event["data"]["ranges"] == [[n + 10, n + 12]] and event["data"]["stream"] == stream
            print(f"\nbroker kill -9 x3: {len(missing)} window(s) lost in the broker, repaired by cmd/resend; "
                  f"publisher connects={pub.stats()['connects']}")
        finally:
            stop.set()
            pub.stop()
            sub.close()


PUBLISHER_PROCESS = r"""
import sys, time
from edge_sdk.device_agent.outbox import Outbox
from edge_sdk.device_agent.mqtt_publisher import MqttSettings, Publisher
path, url, fleet, device = sys.argv[1:5]
ob = Outbox(path)
pub = Publisher(MqttSettings(url, fleet, device, keepalive=60), ob, model={"name": "m", "version": "1"})
pub.start()
while not pub.connected:
    time.sleep(0.01)
print("connected", flush=True)
time.sleep(600)
"""


def test_kill_9_of_the_device_makes_the_broker_publish_the_retained_last_will(
        mosquitto: MosquittoProcess, tmp_path: Path) -> None:  # noqa: F811
    fleet = unique_fleet()
    status_topic = f"edge/{fleet}/dev1/status"
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER_PROCESS, str(tmp_path / "o.db"), mosquitto.url, fleet,
                             "dev1"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
        with Subscriber(mosquitto.url, status_topic) as sub:
            assert wait_until(lambda: [m.json()["state"] for m in sub.received()] == ["online"], 10)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            assert wait_until(lambda: len(sub.received()) == 2, 10)  # no keepalive wait: the socket closed
            offline = sub.received()[1].json()
            assert offline["state"] == "offline" and offline["reason"] == "last will"
            _validator("status")(offline)
        with Subscriber(mosquitto.url, status_topic) as late:
            (retained,) = late.wait_for(1, timeout=5)
        assert retained.retain and retained.json()["state"] == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_commands_reach_on_command_and_resend_is_answered(tmp_path: Path) -> None:
    require_system_broker()
    fleet = unique_fleet()
    received: list[tuple[str, dict[str, Any]]] = []
    with Subscriber(SYSTEM_BROKER, f"edge/{fleet}/+/telemetry") as sub, Outbox(tmp_path / "o.db") as ob:
        ob.put_many([(f"edge/{fleet}/dev1/telemetry", window(i), True) for i in range(10)])
        pub = _publisher(SYSTEM_BROKER, fleet, ob, on_command=lambda name, body: received.append((name, body)))
        pub.start()
        try:
            assert pub.flush(15) and wait_until(lambda: pub.stats()["subscribed"])
            sub.wait_for(10, timeout=10)
            cmd = f"edge/{fleet}/dev1/cmd"
            _send(SYSTEM_BROKER, f"{cmd}/update", _command("update", model={"name": "m", "version": "2"}))
            _send(SYSTEM_BROKER, f"edge/{fleet}/dev2/cmd/update", _command("update"))  # another device's
            _send(SYSTEM_BROKER, f"{cmd}/rollback", b"not json")  # ignored, logged
            _send(SYSTEM_BROKER, f"{cmd}/resend", _command("resend", stream=ob.stream, ranges=[[3, 5]]))
            assert wait_until(lambda: len(sub.received()) == 13, 10)
            assert seqs(sub.payloads()) == [*range(1, 11), 3, 4, 5]
            assert wait_until(lambda: len(received) == 1)
            assert received[0][0] == "update" and received[0][1]["model"]["version"] == "2"
            assert pub.stats()["resend_requests"] == 1 and pub.stats()["requeued"] == 3
        finally:
            pub.stop()
    _clear_retained(f"edge/{fleet}/dev1/status")


def test_unreachable_broker_keeps_rows_until_it_appears(tmp_path: Path) -> None:
    port = free_port()
    fleet = unique_fleet()
    topic = f"edge/{fleet}/dev1/telemetry"
    with Outbox(tmp_path / "o.db") as ob:
        pub = _publisher(f"mqtt://127.0.0.1:{port}", fleet, ob)
        pub.start()  # never raises for a network problem
        try:
            ob.put_many([(topic, window(i), True) for i in range(50)])
            pub.wakeup()
            time.sleep(1.5)  # attempts at 0 s and 1 s failed; the next one comes about 2 s later
            assert not pub.connected and ob.stats()["pending"] == 50
            broker = own_mosquitto(tmp_path / "m", port=port)
            try:
                with Subscriber(broker.url, topic) as sub:
                    assert pub.flush(30)  # paho retries with backoff (1 s doubling, at most 30 s)
                    sub.wait_for(50)
                    assert seqs(sub.payloads()) == list(range(1, 51))
            finally:
                broker.stop()
        finally:
            pub.stop(timeout=2)


def test_falls_back_to_mqtt_311_on_the_embedded_broker(tmp_path: Path) -> None:
    broker = start_embedded_broker()
    assert broker.host == "127.0.0.1"
    fleet = unique_fleet()
    topic = f"edge/{fleet}/dev1/telemetry"
    try:
        with Subscriber(broker.url, topic, protocol="3.1.1") as sub, Outbox(tmp_path / "o.db") as ob:
            ob.put_many([(topic, window(i), True) for i in range(100)])
            pub = _publisher(broker.url, fleet, ob)
            pub.start()
            try:
                assert pub.flush(20)
                assert pub.stats()["protocol"] == "3.1.1"
                assert seqs([m.json() for m in sub.wait_for(100, timeout=10)]) == list(range(1, 101))
            finally:
                pub.stop()
    finally:
        broker.stop()


def test_settings_are_checked() -> None:
    for bad in ({"url": "http://x"}, {"fleet": "a/b"}, {"device": "+"}, {"max_inflight": 0},
                {"key_file": "k.pem"}):
        args = {"url": "mqtt://127.0.0.1:1883", "fleet": "f", "device": "d", **bad}
        with pytest.raises(TelemetryError):
            MqttSettings(**args)
    s = MqttSettings("mqtts://broker.example", "f", "d")
    assert s.tls and s.port == 8883 and s.effective_client_id == "edge-f-d"
    assert MqttSettings("mqtt://h", "f", "d", ca_file="/x").tls


def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    ca, server_cert, server_key = _make_certs(tmp_path)
    broker = own_mosquitto(tmp_path / "m", tls={"certfile": str(server_cert), "keyfile": str(server_key)})
    fleet = unique_fleet()
    try:
        with Outbox(tmp_path / "o.db") as ob:
            ob.put_many([(f"edge/{fleet}/dev1/telemetry", window(i), True) for i in range(20)])
            pub = _publisher(f"mqtts://localhost:{broker.port}", fleet, ob, ca_file=str(ca))
            pub.start()
            try:
                assert pub.flush(15), pub.stats()
            finally:
                pub.stop()
            # a client that does not trust the private CA never delivers anything
            ob.put(f"edge/{fleet}/dev1/telemetry", window(99), sequenced=True)
            untrusting = _publisher(f"mqtts://localhost:{broker.port}", fleet, ob)
            untrusting.start()
            try:
                time.sleep(1.5)
                assert not untrusting.connected and ob.stats()["pending"] == 1
            finally:
                untrusting.stop(timeout=2)
        with pytest.raises(TelemetryError, match="does not exist"):
            _publisher(broker.url, fleet, Outbox(tmp_path / "p.db"), ca_file=str(tmp_path / "nope.pem")).start()
    finally:
        broker.stop()


def _make_certs(directory: Path) -> tuple[Path, Path, Path]:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-sdk test CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def test_a_row_larger_than_the_broker_accepts_is_kept_aside(mosquitto: MosquittoProcess, tmp_path: Path) -> None:  # noqa: F811
    fleet = unique_fleet()
    topic = f"edge/{fleet}/dev1/telemetry"
    with Subscriber(mosquitto.url, topic) as sub, Outbox(tmp_path / "o.db") as ob:
        ob.put(topic, window(0), sequenced=True)
        ob.put(topic, {**window(1), "pad": "x" * 1_100_000}, sequenced=True)  # the shipped max_packet_size is 1 MiB
        ob.put(topic, window(2), sequenced=True)
        pub = _publisher(mosquitto.url, fleet, ob)
        pub.start()
        try:
            assert pub.flush(15), pub.stats()
            sub.wait_for(2)
            time.sleep(0.3)
            assert seqs(sub.payloads()) == [1, 3]
            assert pub.stats()["rejected"] == 1 and ob.stats()["rejected"] == 1 and pub.stats()["connects"] == 1
        finally:
            pub.stop()
