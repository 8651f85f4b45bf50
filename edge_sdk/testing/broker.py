"""Start an MQTT broker for tests, benchmarks and demos.

* :func:`start_mosquitto` runs a real ``mosquitto`` on a free loopback port with a config rendered from the shipped
  production file ``edge_sdk/fleet/broker/mosquitto.conf`` (only the listener, paths and authentication lines are
  replaced), optionally with the shipped ``acl`` and a password file made from ``users``. The process can be
  stopped, killed (``SIGKILL``) and restarted on the same port with the same persistence directory.
* :func:`start_embedded_broker` runs the pure-Python amqtt broker (MQTT 3.1.1 only) in a background thread, bound to
  127.0.0.1 unless told otherwise: the no-install default of ``make demo``.

Real deployments run Mosquitto with the shipped files (see ``edge_sdk/fleet/broker/README.md``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from edge_sdk._deps import require
from edge_sdk.errors import BrokerError

__all__ = [
    "BROKER_FILES", "BrokerError", "EmbeddedBroker", "MosquittoProcess", "free_port", "mosquitto_password_line",
    "render_mosquitto_conf", "start_embedded_broker", "start_mosquitto",
]

BROKER_FILES = Path(__file__).resolve().parents[1] / "fleet" / "broker"
# lines of the shipped config that start_mosquitto replaces (listener, paths, authentication, TLS, logging)
_REPLACED = {
    "listener", "password_file", "acl_file", "allow_anonymous", "persistence", "persistence_location", "log_dest",
    "pid_file", "user", "certfile", "keyfile", "cafile", "capath", "require_certificate", "use_identity_as_username",
    "tls_version", "port", "bind_address",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def mosquitto_password_line(username: str, password: str, iterations: int = 101) -> str:
    """One ``password_file`` line in Mosquitto 2's ``$7$`` format (PBKDF2-SHA512), as ``mosquitto_passwd`` writes."""
    if not username or ":" in username or "\n" in username + password:
        raise BrokerError(f"username {username!r} cannot go into a password file: no ':' or newlines")
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"{username}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def render_mosquitto_conf(port: int, data_dir: Path, *, password_file: Path | None, acl_file: Path | None,
                          persistence: bool, log_file: Path, tls: dict[str, str] | None = None,
                          template: Path | None = None) -> str:
    """The shipped ``mosquitto.conf`` with its listener, paths and authentication replaced for a local broker.

    ``tls`` adds listener options such as ``{"certfile": ..., "keyfile": ..., "cafile": ...,
    "require_certificate": "true"}`` right after the listener line.
    """
    source = (template or BROKER_FILES / "mosquitto.conf").read_text(encoding="utf-8")
    kept = [line for line in source.splitlines()
            if not line.strip() or line.lstrip().startswith("#") or line.split()[0] not in _REPLACED]
    kept += [
        "", "# --- replaced by edge_sdk.testing.broker.start_mosquitto ---",
        f"listener {port} 127.0.0.1",
        *(f"{key} {value}" for key, value in (tls or {}).items()),
        f"allow_anonymous {'false' if password_file else 'true'}",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {data_dir}/",
        f"log_dest file {log_file}",
    ]
    if password_file:
        kept.append(f"password_file {password_file}")
    if acl_file:
        kept.append(f"acl_file {acl_file}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        kept.append("user root")  # otherwise mosquitto drops to 'mosquitto' and cannot read our private temp dir
    return "\n".join(kept) + "\n"


def _mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)
    if not found:
        raise BrokerError("the mosquitto binary is not installed: apt-get install mosquitto (or brew install "
                          "mosquitto), or use start_embedded_broker()")
    return found


def _wait_listening(host: str, port: int, proc: subprocess.Popen[bytes] | None, timeout: float,
                    log_file: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            log = log_file.read_text(errors="replace")[-600:] if log_file and log_file.exists() else ""
            raise BrokerError(f"mosquitto exited with code {proc.returncode} right after starting: {log.strip()}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise BrokerError(f"the broker did not listen on {host}:{port} within {timeout:.0f} s")


class MosquittoProcess:
    """A ``mosquitto`` child process on ``127.0.0.1:port`` (see :func:`start_mosquitto`)."""

    def __init__(self, port: int, workdir: Path, conf_path: Path, log_path: Path) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.workdir = workdir
        self.conf_path = conf_path
        self.log_path = log_path
        self.data_dir = workdir / "data"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:<port>``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> MosquittoProcess:
        """Start (or start again) on the same port, config and persistence directory; returns once it listens."""
        if self.running:
            return self
        deadline = time.monotonic() + timeout
        while True:  # after a kill the port may still be held for a moment; retry until it binds
            self.proc = subprocess.Popen([_mosquitto_binary(), "-c", str(self.conf_path)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                _wait_listening(self.host, self.port, self.proc, max(0.5, deadline - time.monotonic()),
                                self.log_path)
                return self
            except BrokerError:
                if self.proc.poll() is None or time.monotonic() > deadline:
                    self.kill()
                    raise
                time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly (SIGTERM: mosquitto saves its persistence file) and wait."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, like a crash or power cut of the broker host: nothing is saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, *, kill: bool = False, timeout: float = 10.0) -> MosquittoProcess:
        """Stop (or kill) and start again on the same port, keeping the persistence directory."""
        self.kill() if kill else self.stop()
        return self.start(timeout)

    def log(self) -> str:
        """The broker's log so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> MosquittoProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_mosquitto(tmpdir: str | os.PathLike[str], *, port: int | None = None, acl: bool = False,
                    users: dict[str, str] | None = None, persistence: bool = True,
                    tls: dict[str, str] | None = None) -> MosquittoProcess:
    """Run ``mosquitto`` on ``127.0.0.1:port`` (a free port by default) with the shipped config.

    ``users`` ({username: password}) turns on password authentication (anonymous clients are refused); ``acl=True``
    also applies the shipped ``acl`` file (device username == device id, plus the ``collector`` user). Files and the
    persistence directory live in ``tmpdir``. ``tls`` makes the listener a TLS one (see
    :func:`render_mosquitto_conf`). Stop it with :meth:`MosquittoProcess.stop` (or use it as a context
    manager).
    """
    if acl and not users:
        raise BrokerError("acl=True needs users={name: password}: with the shipped ACL anonymous clients can do "
                          "nothing")
    workdir = Path(tmpdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    (workdir / "data").mkdir(exist_ok=True)
    password_file = acl_file = None
    if users:
        password_file = workdir / "passwd"
        password_file.write_text("".join(mosquitto_password_line(u, p) + "\n" for u, p in users.items()))
        password_file.chmod(0o600)
    if acl:
        acl_file = workdir / "acl"
        shutil.copyfile(BROKER_FILES / "acl", acl_file)
    log_path = workdir / "mosquitto.log"
    conf_path = workdir / "mosquitto.conf"
    conf_path.write_text(render_mosquitto_conf(port, workdir / "data", password_file=password_file,
                                               acl_file=acl_file, persistence=persistence, log_file=log_path,
                                               tls=tls))
    return MosquittoProcess(port, workdir, conf_path, log_path).start()


class EmbeddedBroker:
    """An amqtt broker running in a daemon thread with its own event loop (see :func:`start_embedded_broker`)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="edge-embedded-broker", daemon=True)

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    def _run(self) -> None:
        amqtt_broker = require("amqtt.broker", "fleet", "the embedded MQTT broker")
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def main() -> None:
            config = {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
            self._stopped = asyncio.Event()
            try:
                self._broker = amqtt_broker.Broker(config)
                await self._broker.start()
                sockets = self._broker._servers["default"].instance.sockets
                self.port = int(sockets[0].getsockname()[1])
            except BaseException as exc:  # reported to the starting thread, which raises it as BrokerError
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await self._stopped.wait()
            await self._broker.shutdown()

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start the thread; returns once the broker listens."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise BrokerError(f"the embedded broker did not start within {timeout:.0f} s")
        if self._error is not None:
            raise BrokerError(f"the embedded broker could not start on {self.host}:{self.port}: {self._error}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the broker down and join its thread."""
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stopped.set)
        self._thread.join(timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_embedded_broker(host: str = "127.0.0.1", port: int = 0) -> EmbeddedBroker:
    """Run the amqtt broker (MQTT 3.1.1, anonymous, in memory) in a background thread; ``port=0`` picks a free one.

    It binds to 127.0.0.1 by default (amqtt's own default is every interface). The device publisher falls back to
    MQTT 3.1.1 automatically when a broker refuses v5.
    """
    return EmbeddedBroker(host, port).start()
