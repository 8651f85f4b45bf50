"""What data capture keeps and how it is configured: the four policies, ``[capture]`` of ``agent.toml``
(:class:`CaptureSettings`), the sample header and the sample types (see :mod:`edge_sdk.device_agent.capture`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from edge_sdk.errors import ConfigError, TelemetryError

__all__ = ["CAPTURE_KEYS", "POLICIES", "SAMPLE_HEADER", "CaptureError", "CaptureSettings", "sample_ext"]

#: the capture policies, in the order a prediction is checked against them
POLICIES = ("random", "low_confidence", "drift", "feedback_disagree")
#: keys of the ``[capture]`` table
CAPTURE_KEYS = ("enabled", "dir", "sample_rate", "low_confidence", "drift", "drift_psi", "drift_per_window",
                "feedback_disagree", "feedback_buffer_bytes", "max_bytes", "max_sample_bytes", "queue_size",
                "upload_url", "token_file", "ca_file", "upload_interval_s")
#: request header carrying a sample's metadata (compact JSON) on ``POST /api/samples``
SAMPLE_HEADER = "X-Edge-Sample"


class CaptureError(TelemetryError):
    """The capture store cannot be opened or written (damaged, read-only, disk full)."""


def sample_ext(data: bytes | bytearray | memoryview) -> str | None:
    """The file extension of a sample from its first bytes: ``png``, ``jpg``, ``npy``, or None for anything else."""
    head = bytes(data[:8])
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    return None


@dataclass(frozen=True)
class CaptureSettings:
    """``[capture]`` of ``agent.toml`` (every key optional; a present table turns capture on unless
    ``enabled = false``)::

        [capture]
        sample_rate = 0.01            # random: this fraction of all predictions
        low_confidence = 0.5          # predictions whose top-1 confidence is below this
        drift = true                  # inputs of telemetry windows whose input PSI is over drift_psi
        drift_psi = 0.2               #   (the collector's drift threshold; needs [telemetry])
        drift_per_window = 4          #   at most this many per drifting window (a uniform sample of the window)
        feedback_disagree = true      # every /feedback whose label disagrees with the prediction
        feedback_buffer_bytes = 33554432  # memory for recent inputs awaiting feedback (oldest forgotten first)
        dir = "/var/lib/edge-sdk/capture"  # on-device store (relative to the config file)
        max_bytes = 268435456         # the store's cap: the oldest samples are dropped (and counted) beyond it
        max_sample_bytes = 4194304    # a larger sample is not kept (counted); default min(4 MiB, max_bytes)
        queue_size = 64               # samples waiting for the disk; beyond it they are dropped (and counted)
        upload_url = "https://collector.example:8000"   # the collector's HTTP base URL (none: keep on the device)
        token_file = "/etc/edge-sdk/collector.token"    # the collector's HTTP token (Authorization: Bearer)
        ca_file = "/etc/edge-sdk/ca.crt"               # CA bundle for an https upload_url
        upload_interval_s = 10        # how often the uploader sends what is stored

    At least one policy must be on.
    """

    enabled: bool = False
    dir: str = "edge-sdk-capture"
    sample_rate: float = 0.0
    low_confidence: float | None = None
    drift: bool = False
    drift_psi: float = 0.2
    drift_per_window: int = 4
    feedback_disagree: bool = False
    feedback_buffer_bytes: int = 32 * 1024 * 1024
    max_bytes: int = 256 * 1024 * 1024
    max_sample_bytes: int = None  # type: ignore[assignment]  # default: min(4 MiB, max_bytes)
    queue_size: int = 64
    upload_url: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    upload_interval_s: float = 10.0

    def __post_init__(self) -> None:
        def num(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ConfigError(f"capture {name} must be a number between {lo:g} and {hi:g}, got {v!r}")

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"capture {name} must be an integer >= {lo}, got {v!r}")

        if self.max_sample_bytes is None and isinstance(self.max_bytes, int):
            object.__setattr__(self, "max_sample_bytes", min(4 * 1024 * 1024, self.max_bytes))
        num("sample_rate", 0.0, 1.0)
        if self.low_confidence is not None:
            num("low_confidence", 0.0, 1.0)
        num("drift_psi", 0.0, 100.0)
        num("upload_interval_s", 0.01, 86400.0)
        for name in ("drift_per_window", "feedback_buffer_bytes", "max_bytes", "max_sample_bytes", "queue_size"):
            integer(name, 1)
        if self.max_sample_bytes > self.max_bytes:
            raise ConfigError(f"capture max_sample_bytes ({self.max_sample_bytes}) must not exceed max_bytes "
                              f"({self.max_bytes})")
        if self.upload_url is not None and not self.upload_url.startswith(("http://", "https://")):
            raise ConfigError(f"capture upload_url {self.upload_url!r} must be the collector's http(s):// base URL")
        if self.enabled and not self.policies():
            raise ConfigError("capture is enabled but no policy is on: set sample_rate, low_confidence, drift = true "
                              "or feedback_disagree = true in [capture]")

    def policies(self) -> list[str]:
        """The policies these settings turn on."""
        on = {"random": self.sample_rate > 0, "low_confidence": self.low_confidence is not None,
              "drift": self.drift, "feedback_disagree": self.feedback_disagree}
        return [p for p in POLICIES if on[p]]

