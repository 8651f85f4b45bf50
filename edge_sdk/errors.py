"""The exception tree of edge_sdk. Every error the SDK raises derives from :class:`EdgeSDKError`.

    EdgeSDKError
    ├── MissingDependencyError      an optional framework/runtime is not installed (names the extra)
    ├── SourceModelError            the source model cannot be read (corrupt, truncated, wrong kind)
    ├── CalibrationError            calibration / validation data missing or unusable
    ├── ConversionError             a converter failed
    │   └── UnsupportedConversionError  the target cannot express this source / precision
    ├── ValidationError             one or more artifacts are over tolerance (lists them all)
    ├── BundleError                 a bundle or manifest is missing, malformed or tampered with
    │   └── SignatureError          unsigned, wrong key, or changed after signing (edge_sdk.signing)
    ├── InferenceError              a runtime could not load or run an artifact
    │   └── InputError              inputs have the wrong shape, dtype or values
    ├── TelemetryError              telemetry could not be stored or sent
    │   └── OutboxError             the on-disk outbox is unwritable or damaged (device_agent.outbox)
    ├── UpdateError                 an over-the-air update was refused or failed (device_agent.model_store)
    └── fleet side (edge_sdk.fleet): DatabaseError, PayloadError, CollectorError, BrokerError, ConfigError,
        RegistryError, GateError, RolloutError, CommandPublishError — each defined next to its code

Modules that define a subclass keep it local so that importing edge_sdk.errors stays free of optional packages.

Messages are one line: what is wrong, then how to fix it.
"""

from __future__ import annotations

__all__ = [
    "BundleError",
    "CalibrationError",
    "ConversionError",
    "EdgeSDKError",
    "InferenceError",
    "InputError",
    "MissingDependencyError",
    "SourceModelError",
    "TelemetryError",
    "UnsupportedConversionError",
    "ValidationError",
    "first_line",
]


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first non-empty line of an exception's message (its type name when it has none), at most ``limit``
    characters: what a one-line error quotes from a tool that raised."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


class EdgeSDKError(Exception):
    """Base class of every error raised by edge_sdk."""


class MissingDependencyError(EdgeSDKError, ImportError):
    """An optional dependency is missing; the message names the pip extra that provides it."""

    def __init__(self, module: str, extra: str, purpose: str = "") -> None:
        self.module = module
        self.extra = extra
        what = f" (needed for {purpose})" if purpose else ""
        super().__init__(
            f"{module} is not installed{what}: pip install \"edge-sdk[{extra}]\""
        )


class SourceModelError(EdgeSDKError):
    """The source model cannot be loaded."""


class CalibrationError(EdgeSDKError):
    """Calibration or validation data is missing or does not fit the model."""


class ConversionError(EdgeSDKError):
    """A conversion step failed."""


class UnsupportedConversionError(ConversionError):
    """The requested target/precision cannot be produced from this source."""


class ValidationError(EdgeSDKError):
    """One or more artifacts failed validation; ``failures`` lists every one of them."""

    def __init__(self, message: str, failures: list[str] | None = None) -> None:
        self.failures = list(failures or [])
        super().__init__(message)


class BundleError(EdgeSDKError):
    """A bundle or its manifest is missing, malformed, or does not match its files."""


class InferenceError(EdgeSDKError):
    """A runtime could not load or run an artifact."""


class InputError(InferenceError, ValueError):
    """Inputs given to a model have the wrong names, shape, dtype or values."""


class TelemetryError(EdgeSDKError):
    """Telemetry could not be stored or delivered."""
