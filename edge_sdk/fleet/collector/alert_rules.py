"""Alert rule settings: the shipped ``alerts.toml`` (data, documented key by key) and an optional user file that
overrides some keys, read into frozen dataclasses by :func:`load_rules`. An unknown section or key, or a value of
the wrong type or range, raises :class:`ConfigError` with one line naming the file and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConfigError
from edge_sdk.tomlfile import read_toml

__all__ = ["DEFAULT_RULES_FILE", "AlertRules", "ConfidenceRule", "ConfigError", "DriftRule", "ErrorRateRule",
           "LatencyRule", "NotifySettings", "OfflineRule", "load_rules"]

DEFAULT_RULES_FILE = Path(__file__).resolve().parent / "alerts.toml"
_SEVERITIES = ("info", "warning", "critical")


@dataclass(frozen=True)
class DriftRule:
    """Input drift (PSI) over the last ``windows`` windows; see alerts.toml."""

    enabled: bool
    threshold: float
    windows: int
    min_windows: int
    min_samples: int
    method: str
    severity: str


@dataclass(frozen=True)
class LatencyRule:
    """p95 latency of the merged sketches of the last ``windows`` windows over ``p95_ms``."""

    enabled: bool
    p95_ms: float
    windows: int
    min_count: int
    severity: str


@dataclass(frozen=True)
class ErrorRateRule:
    """Error-rate spike over the last ``windows`` windows against an absolute and a trailing threshold."""

    enabled: bool
    threshold: float
    factor: float
    windows: int
    baseline_windows: int
    min_events: int
    severity: str


@dataclass(frozen=True)
class ConfidenceRule:
    """Mean confidence of the last ``windows`` windows below the trailing mean - delta or below ``floor``."""

    enabled: bool
    delta: float
    floor: float
    windows: int
    baseline_windows: int
    min_count: int
    severity: str


@dataclass(frozen=True)
class OfflineRule:
    """Status offline, or no message for ``missed_windows`` telemetry windows."""

    enabled: bool
    missed_windows: float
    default_window_s: float
    severity: str


@dataclass(frozen=True)
class NotifySettings:
    """How alert changes are grouped into notifications (per rule and fleet, like Alertmanager); see alerts.toml."""

    group_wait_s: float
    group_interval_s: float
    repeat_interval_s: float
    max_alerts: int
    sample_devices: int


@dataclass(frozen=True)
class AlertRules:
    """Every rule plus the evaluation interval, the webhook timeout and the notification grouping."""

    interval_s: float
    webhook_timeout_s: float
    drift: DriftRule
    latency_sla: LatencyRule
    error_rate: ErrorRateRule
    confidence_drop: ConfidenceRule
    offline: OfflineRule
    notify: NotifySettings


_SECTIONS: dict[str, type] = {"drift": DriftRule, "latency_sla": LatencyRule, "error_rate": ErrorRateRule,
                              "confidence_drop": ConfidenceRule, "offline": OfflineRule, "notify": NotifySettings}
_ZERO_OK = ("threshold", "floor", "delta", "min_samples", "group_wait_s", "repeat_interval_s", "max_alerts")
_TOP = ("interval_s", "webhook_timeout_s")


def _read_toml(path: Path) -> dict[str, Any]:
    return read_toml(path, kind="rules file", missing_hint="check the --rules path")


def _value(path: Path, key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: key {key!r} must be true or false, not {value!r}")
        return value
    if kind in (int, float):
        wrong = isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float))
        if wrong:
            raise ConfigError(f"{path}: key {key!r} must be {'an integer' if kind is int else 'a number'}, "
                              f"not {value!r}")
        if value < 0 or (value == 0 and not key.endswith(_ZERO_OK)):
            raise ConfigError(f"{path}: key {key!r} must be {'>= 0' if key.endswith('threshold') else '> 0'}, "
                              f"not {value!r}")
        return kind(value)
    if not isinstance(value, str):
        raise ConfigError(f"{path}: key {key!r} must be a string, not {value!r}")
    if key.endswith("severity") and value not in _SEVERITIES:
        raise ConfigError(f"{path}: key {key!r} must be one of {', '.join(_SEVERITIES)}, not {value!r}")
    if key == "drift.method" and value not in ("auto", "pooled", "votes"):
        raise ConfigError(f"{path}: key {key!r} must be auto, pooled or votes, not {value!r}")
    return value


def _overlay(base: dict[str, Any], data: dict[str, Any], path: Path) -> None:
    for key, value in data.items():
        if key in _TOP:
            base[key] = value
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: key {key!r} must be a [{key}] table")
            known = {f.name for f in fields(_SECTIONS[key])}
            for sub, v in value.items():
                if sub not in known:
                    raise ConfigError(f"{path}: unknown key '{key}.{sub}': choose from {', '.join(sorted(known))}")
                base.setdefault(key, {})[sub] = v
        else:
            raise ConfigError(f"{path}: unknown key {key!r}: choose from {', '.join([*_TOP, *_SECTIONS])}")


def load_rules(path: str | Path | None = None) -> AlertRules:
    """The shipped rules (alerts.toml) with the keys of ``path`` (if given) replacing theirs."""
    merged: dict[str, Any] = {}
    _overlay(merged, _read_toml(DEFAULT_RULES_FILE), DEFAULT_RULES_FILE)
    source = DEFAULT_RULES_FILE
    if path is not None:
        source = Path(path)
        _overlay(merged, _read_toml(source), source)
    hints = {"interval_s": float, "webhook_timeout_s": float}
    top = {k: _value(source, k, merged[k], hints[k]) for k in _TOP}
    sections = {}
    for name, cls in _SECTIONS.items():
        kinds = {"bool": bool, "int": int, "float": float, "str": str}
        values = {f.name: _value(source, f"{name}.{f.name}", merged[name][f.name], kinds[str(f.type)])
                  for f in fields(cls)}
        sections[name] = cls(**values)
    d = sections["drift"]
    if d.min_windows > d.windows:
        raise ConfigError(f"{source}: key 'drift.min_windows' ({d.min_windows}) must not exceed drift.windows "
                          f"({d.windows})")
    return AlertRules(**top, **sections)
