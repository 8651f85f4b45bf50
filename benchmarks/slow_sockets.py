"""1,000 idle and slow sockets against a real agent HTTP server in its own process (issue 13, acceptance 4).

The attack keeps ``--sockets`` connections open for the whole run: a third only connect, a third trickle their
headers (one byte per second per socket), a third send complete headers announcing a 400-byte body and trickle
it. A socket the server closes (header / request deadline) is reopened at once, so the server always faces the
full count. Meanwhile ``--requests`` normal ``POST /predict`` requests (a JPEG, a fresh connection each) are
sent one after another, spread over ``--duration`` seconds (longer than the deadlines, so closing and
reconnecting is part of the run); printed: their p50/p99/max latency and failures, the agent process's thread count
(``/proc/<pid>/status``) before and at its highest during the attack, and how many attack sockets the server
closed. The run fails unless every normal request is answered 200 and the thread count stays bounded.

    python benchmarks/slow_sockets.py [--sockets 1000] [--requests 200] [--duration 40] [--bundle DIR]

Without ``--bundle`` a tiny 32x32 CNN bundle is built (needs torch).
"""

from __future__ import annotations

import argparse
import http.client
import json
import resource
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostile_images import build_tiny_bundle

ROOT = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    from edge_sdk.device_agent.agent import Agent
    from edge_sdk.device_agent.server import AgentServer
    agent = Agent(Path(sys.argv[1]))
    srv = AgentServer(agent, "127.0.0.1", 0, queue_size=8)
    print(srv.start(), flush=True)
    sys.stdin.read()
    srv.shutdown()
""")

_BODY_HEAD = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n")


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError(f"no thread count for pid {pid}")


class Attack:
    """Keeps ``n`` idle / header-trickling / body-trickling sockets open against ``port``."""

    def __init__(self, port: int, n: int) -> None:
        self.port, self.n = port, n
        self.socks: list[socket.socket | None] = [None] * n
        self.reopened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, i: int) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.setblocking(False)
        if i % 3 == 2:
            s.send(_BODY_HEAD)
        self.socks[i] = s

    def start(self) -> None:
        for i in range(self.n):
            self._open(i)
        self.thread.start()

    def _run(self) -> None:
        trickle = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 10_000
        step = 0
        while not self.stop.wait(1.0):
            step += 1
            for i, s in enumerate(self.socks):
                if s is None or self.stop.is_set():
                    continue
                try:
                    if s.recv(4096) == b"":
                        raise ConnectionResetError
                except BlockingIOError:
                    pass
                except OSError:  # closed by the server: the attacker reconnects
                    s.close()
                    self.reopened += 1
                    try:
                        self._open(i)
                    except OSError:
                        self.socks[i] = None
                    continue
                try:
                    if i % 3 == 1:
                        s.send(trickle[step % len(trickle):step % len(trickle) + 1])
                    elif i % 3 == 2:
                        s.send(b" ")
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for s in self.socks:
            if s is not None:
                s.close()


def _predict(port: int, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/jpeg"})
        resp = conn.getresponse()
        json.loads(resp.read())
        return resp.status
    except (OSError, http.client.HTTPException, ValueError):
        return 0
    finally:
        conn.close()


def run(bundle: Path, n_sockets: int, n_requests: int, duration: float) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_hostile_images import good_jpeg

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n_sockets + 512)), hard))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(bundle)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    good = good_jpeg()
    try:
        port = int(child.stdout.readline())
        for _ in range(5):
            assert _predict(port, good) == 200
        threads_before = _threads(child.pid)
        attack = Attack(port, n_sockets)
        attack.start()
        threads_max = threads_before
        time.sleep(2.0)
        times: list[float] = []
        failures = 0
        try:
            start = time.perf_counter()
            for i in range(n_requests):
                time.sleep(max(0.0, start + i * duration / n_requests - time.perf_counter()))
                t = time.perf_counter()
                status = _predict(port, good)
                times.append(time.perf_counter() - t)
                failures += status != 200
                threads_max = max(threads_max, _threads(child.pid))
        finally:
            attack.close()
    finally:
        child.stdin.close()
        child.wait(30)
    times.sort()
    p = [times[min(len(times) - 1, int(q * len(times)))] * 1000 for q in (0.5, 0.99)]
    print(f"attack: {n_sockets} sockets (1/3 idle, 1/3 trickling headers, 1/3 trickling a body), "
          f"{attack.reopened} reopened after the server closed them")
    print(f"normal requests: {n_requests}, failed: {failures}; latency p50 {p[0]:.1f} ms, p99 {p[1]:.1f} ms, "
          f"max {times[-1] * 1000:.1f} ms")
    print(f"agent threads: {threads_before} before the attack, at most {threads_max} during it")
    ok = failures == 0 and threads_max <= threads_before + 4
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sockets", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--duration", type=float, default=40.0, help="seconds the normal requests are spread over")
    ap.add_argument("--bundle", type=Path, help="an image-model bundle (default: a tiny CNN, built now)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or build_tiny_bundle(Path(tmp))
        return run(bundle, args.sockets, args.requests, args.duration)


if __name__ == "__main__":
    sys.exit(main())
