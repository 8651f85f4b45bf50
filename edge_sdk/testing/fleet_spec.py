"""What the processes of a simulated agent fleet share: the :class:`FleetSpec` handed to every child process, the
device ids, the per-device ``[capture]`` settings and the name of each device's report file
(see :mod:`edge_sdk.testing.agent_fleet`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REPORT_NAME", "FleetSpec", "capture_settings", "device_ids"]

#: each device's report file, ``<store_root>/<device>/report.json``
REPORT_NAME = "report.json"


def device_ids(n: int, prefix: str = "dev") -> list[str]:
    """``n`` device ids ``<prefix>000``, ``<prefix>001`` ... (three digits at least)."""
    return [f"{prefix}{i:03d}" for i in range(n)]


@dataclass(frozen=True)
class FleetSpec:
    """What every device of a simulated fleet shares (JSON-ready: it is handed to the child processes).

    ``inputs_path``: an ``.npz`` with ``images`` (uint8, N x H x W or N x H x W x 3 BGR) and optionally ``labels``;
    ``feedback_every``: send the true label of every n-th prediction back (0: never; needs labels);
    ``capture``: the device's ``[capture]`` table (keys of
    :class:`~edge_sdk.device_agent.capture.CaptureSettings`; ``dir`` is ``<store_root>/<device>/capture``), None: off.
    """

    fleet: str
    mqtt_url: str
    store_root: str
    initial_bundle: str
    trusted_keys: list[str]
    inputs_path: str
    window_s: float = 1.0
    rate_hz: float = 5.0
    feedback_every: int = 0
    session_expiry_s: int = 600
    report_every_s: float = 1.0
    runtime_order: list[str] = field(default_factory=lambda: ["onnxruntime"])
    seed: int = 0
    capture: dict[str, Any] | None = None


def capture_settings(table: dict[str, Any] | None, directory: str | os.PathLike) -> Any:
    """The :class:`~edge_sdk.device_agent.capture.CaptureSettings` of a ``[capture]`` table for one device (None:
    capture off); ``dir`` is always ``directory`` (each device has its own store). ConfigError for a bad table."""
    from edge_sdk.device_agent.capture import CAPTURE_KEYS, CaptureSettings
    from edge_sdk.errors import ConfigError

    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"capture must be a [capture] table (a dict), got {type(table).__name__}")
    unknown = sorted(set(table) - set(CAPTURE_KEYS))
    if unknown:
        raise ConfigError(f"unknown [capture] key(s) {', '.join(unknown)}: valid keys are {', '.join(CAPTURE_KEYS)}")
    return CaptureSettings(**{"enabled": True, **table, "dir": str(directory)})
