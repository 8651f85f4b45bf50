"""Device health for telemetry windows, read from Linux's /proc and /sys with the standard library only.

Every field is None when it cannot be read (another OS, a container without /sys, a board without a
thermal sensor), never an error: health is reported alongside the model's aggregates, it must not stop them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["THERMAL_ROOT", "cpu_temperature", "read_health"]

THERMAL_ROOT = Path("/sys/class/thermal")
#: substrings of a thermal zone's ``type`` that name the CPU / SoC sensor, in order of preference
_CPU_ZONES = ("x86_pkg", "cpu", "soc")


def cpu_temperature(root: str | os.PathLike = THERMAL_ROOT) -> float | None:
    """CPU temperature in °C from the first CPU / x86 package / SoC thermal zone under ``root``; None if none."""
    zones: list[tuple[int, str, Path]] = []
    try:
        entries = sorted(Path(root).glob("thermal_zone*"))
    except OSError:
        return None
    for zone in entries:
        try:
            kind = (zone / "type").read_text().strip().lower()
        except OSError:
            continue
        rank = next((i for i, name in enumerate(_CPU_ZONES) if name in kind), None)
        if rank is not None:
            zones.append((rank, zone.name, zone))
    for _, _, zone in sorted(zones):
        try:
            milli = int((zone / "temp").read_text().strip())
        except (OSError, ValueError):
            continue
        celsius = milli / 1000.0
        if -60.0 < celsius < 200.0:  # a disabled or absent sensor reads as 0 mC on some boards or as garbage
            return round(celsius, 1)
    return None


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                out[key] = int(parts[0])
    return out


def _mem_used_frac() -> float | None:
    try:
        info = _meminfo()
    except OSError:
        return None
    total, avail = info.get("MemTotal"), info.get("MemAvailable")
    if not total or avail is None:
        return None
    return round(min(max(1.0 - avail / total, 0.0), 1.0), 4)


def _rss_mb() -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024.0, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _uptime_s() -> float | None:
    try:
        with open("/proc/uptime", encoding="ascii") as f:
            return round(float(f.read().split()[0]), 1)
    except (OSError, ValueError, IndexError):
        return None


def _load1() -> float | None:
    try:
        return round(max(os.getloadavg()[0], 0.0), 2)
    except (OSError, AttributeError):  # AttributeError: platforms without getloadavg
        return None


def _disk_free_frac(path: str | os.PathLike) -> float | None:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return round(usage.free / usage.total, 4) if usage.total else None


def read_health(disk_path: str | os.PathLike = ".", *,
                thermal_root: str | os.PathLike = THERMAL_ROOT) -> dict[str, Any]:
    """The ``health`` object of a telemetry window: ``cpu_temp_c``, ``load1``, ``cpu_count``, ``mem_used_frac``,
    ``rss_mb`` (this process), ``disk_free_frac`` (of the file system holding ``disk_path``, e.g. the outbox)
    and ``uptime_s`` (of the device)."""
    return {
        "cpu_temp_c": cpu_temperature(thermal_root),
        "load1": _load1(),
        "cpu_count": os.cpu_count() or None,
        "mem_used_frac": _mem_used_frac(),
        "rss_mb": _rss_mb(),
        "disk_free_frac": _disk_free_frac(disk_path),
        "uptime_s": _uptime_s(),
    }
