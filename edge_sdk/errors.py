"""Every exception the SDK raises, in one module: all derive from :class:`EdgeSDKError`.

    EdgeSDKError
    ├── ConfigError (ValueError)        a settings file, option or URL is wrong (agent config, alert rules, MQTT URL)
    │   └── TargetProfileError          a target profile is unknown or its file is malformed
    ├── MissingDependencyError (ImportError)  an optional framework/runtime is not installed (names the extra)
    ├── SourceModelError                the source model cannot be read (corrupt, truncated, wrong kind)
    ├── CalibrationError                calibration / validation data missing or unusable
    ├── ConversionError                 a converter failed
    │   └── UnsupportedConversionError  the target cannot express this source / precision
    ├── PruneError                      the model cannot be pruned as asked (edge_sdk.optimize.prune)
    ├── ValidationError                 one or more artifacts are over tolerance (lists them all)
    ├── BundleError                     a bundle or manifest is missing, malformed or tampered with
    │   └── SignatureError              unsigned, wrong key, or changed after signing (edge_sdk.signing)
    ├── InferenceError                  a runtime could not load or run an artifact
    │   └── InputError (ValueError)     inputs have the wrong shape, dtype or values
    ├── TelemetryError                  telemetry could not be stored or sent
    │   └── OutboxError                 the on-disk outbox is unwritable or damaged (device_agent.outbox)
    ├── DownloadError                   a download failed for good (device_agent.download)
    ├── UpdateError                     an over-the-air update was refused or failed (device_agent.model_store)
    ├── HTTPError                       a request is answered with an error status (edge_sdk.httpbase)
    │   └── RangeNotSatisfiable         a byte range beyond the end of the file (416)
    ├── DatabaseError                   the fleet database URL is wrong, unreachable, or a migration failed
    ├── PayloadError (ValueError)       a device message was rejected (stored as a dead letter)
    ├── StoreUnavailable                the database refused even a dead letter: keep the batch and retry
    ├── CollectorError                  the collector cannot start (bad options, unreachable broker)
    ├── RegistryError                   a model registry operation is not possible
    ├── GateError                       a promotion was refused by the evaluation gate (carries the decision)
    ├── RolloutError                    a deployment cannot be started or changed
    ├── CommandPublishError             a command could not be delivered to the broker
    ├── BrokerError                     a test broker could not be started or stopped (edge_sdk.testing)
    └── AgentFleetError                 the simulated fleet could not start (edge_sdk.testing)

They live here, not next to their code, so that one ``except`` or one ``isinstance`` needs one import, and so that
there is exactly one class per concept. This module imports nothing but the standard library: a device can import
it without any optional package. The classes are re-exported where they used to be defined.

Messages are one line: what is wrong, then how to fix it. :func:`first_line` turns a third-party exception into
such a line.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AgentFleetError",
    "BrokerError",
    "BundleError",
    "CalibrationError",
    "CollectorError",
    "CommandPublishError",
    "ConfigError",
    "ConversionError",
    "DatabaseError",
    "DownloadError",
    "EdgeSDKError",
    "GateError",
    "HTTPError",
    "InferenceError",
    "InputError",
    "MissingDependencyError",
    "OutboxError",
    "PayloadError",
    "PruneError",
    "RangeNotSatisfiable",
    "RegistryError",
    "RolloutError",
    "SignatureError",
    "SourceModelError",
    "StoreUnavailable",
    "TargetProfileError",
    "TelemetryError",
    "UnsupportedConversionError",
    "UpdateError",
    "ValidationError",
    "first_line",
]


def first_line(exc: BaseException | str, limit: int = 240, *, skip: tuple[str, ...] = ()) -> str:
    """What a one-line error quotes from a tool that raised: the first non-empty line of the message, at most
    ``limit`` characters (the type name when the message is empty).

    An ``OSError`` gives ``strerror: filename`` (not ``[Errno 2] ...: 'name'``). With ``skip``, lines starting
    with one of those prefixes are dropped and the remaining ones are joined with ``"; "``: for tools whose
    message is a trace of source locations with the reason in between (OpenVINO's ``Exception from ...`` /
    ``Check '...'``); when every line is dropped the last one is kept.
    """
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc.strerror)
    else:
        text = str(exc)
    lines = [" ".join(ln.split()) for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if skip:
        useful = [ln for ln in lines if not ln.startswith(skip)]
        lines = ["; ".join(useful or lines[-1:])] if lines else []
    name = exc if isinstance(exc, str) else type(exc).__name__
    return (lines[0] if lines else name or "error")[:limit]


class EdgeSDKError(Exception):
    """Base class of every error raised by edge_sdk."""


class ConfigError(EdgeSDKError, ValueError):
    """A settings file, option or URL is unreadable, unknown or has a bad value (the message names file and key)."""


class TargetProfileError(ConfigError):
    """A target profile is unknown or its file is malformed (the message names the file and the field)."""


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


class PruneError(EdgeSDKError):
    """The model cannot be pruned as asked (architecture, arguments or data)."""


class ValidationError(EdgeSDKError):
    """One or more artifacts failed validation; ``failures`` lists every one of them."""

    def __init__(self, message: str, failures: list[str] | None = None) -> None:
        self.failures = list(failures or [])
        super().__init__(message)


class BundleError(EdgeSDKError):
    """A bundle or its manifest is missing, malformed, or does not match its files."""


class SignatureError(BundleError):
    """A bundle's signature is missing, malformed, untrusted or does not match its files (one-line reason)."""


class InferenceError(EdgeSDKError):
    """A runtime could not load or run an artifact."""


class InputError(InferenceError, ValueError):
    """Inputs given to a model have the wrong names, shape, dtype or values."""


class TelemetryError(EdgeSDKError):
    """Telemetry could not be stored or delivered."""


class OutboxError(TelemetryError):
    """The outbox file cannot be opened, read or written (damaged, locked, read-only, disk full)."""


class DownloadError(EdgeSDKError):
    """A download failed for good (HTTP 4xx, wrong size or sha256, retries exhausted)."""


class UpdateError(EdgeSDKError):
    """A model update, rollback or store operation failed; the running model was left as it was."""


class HTTPError(EdgeSDKError):
    """An error answered to an HTTP client: status, error kind (a metrics label), one-line message, extra headers."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


class RangeNotSatisfiable(HTTPError):
    """The requested byte range lies beyond the end of the file (answered with 416)."""

    def __init__(self, header: str) -> None:
        super().__init__(416, "range_not_satisfiable", f"range {header!r} lies beyond the end of the file")


class DatabaseError(EdgeSDKError):
    """The fleet database URL is wrong, the database cannot be reached, or a migration failed."""


class PayloadError(EdgeSDKError, ValueError):
    """A payload was rejected; ``reason`` is one line naming the field (stored in ``dead_letters``)."""

    def __init__(self, reason: str) -> None:
        # one printable line whatever the payload put in key names or values quoted by the message
        reason = "".join(c if c.isprintable() else repr(c)[1:-1] for c in reason)
        self.reason = reason if len(reason) <= 500 else reason[:497] + "..."
        super().__init__(self.reason)


class StoreUnavailable(EdgeSDKError):
    """The database refused even a dead letter: it is down or full. The batch must be kept and retried."""


class CollectorError(EdgeSDKError):
    """The collector cannot start: bad MQTT URL, unreachable broker, bad options."""


class RegistryError(EdgeSDKError):
    """A registry operation is not possible (unknown model, duplicate version, refused transition ...)."""


class GateError(EdgeSDKError):
    """A promotion was refused by the evaluation gate; ``decision`` holds the figures (a ``GateDecision``)."""

    def __init__(self, message: str, decision: Any) -> None:
        self.decision = decision
        super().__init__(message)


class RolloutError(EdgeSDKError):
    """A deployment cannot be started or changed (not promoted, already running, no devices ...)."""


class CommandPublishError(EdgeSDKError):
    """A command could not be delivered to the broker."""


class BrokerError(EdgeSDKError):
    """A broker could not be started or stopped."""


class AgentFleetError(EdgeSDKError):
    """The simulated fleet could not start (bad arguments, devices that failed to install or connect)."""
