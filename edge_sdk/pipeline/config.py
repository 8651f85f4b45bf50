"""``pipeline.toml``: what the retraining pipeline reads, checked up front with one-line errors naming the key.

Every section and key (relative paths are resolved against the folder of pipeline.toml)::

    [model]
    name = "fashion"                 # the registry's model name (required)
    current = "active"               # the version to beat: "active" (default) or a version string
    source = "models/fashion_v1.pt"  # the current version's source model, when its lineage has none (first run)
    version = "auto"                 # the new version: "auto" = next whole number (else "<current>.r<UTC time>")

    [registry]
    db = "sqlite:///fleet.db"        # the fleet database (default $EDGE_SDK_DB or sqlite:///fleet.db)
    dir = "registry"                 # the registry's archive directory
    trusted_keys = "keys/trusted"    # verify signatures on add (optional)
    allow_unsigned = false           # promote and deploy an unverified version (development only)

    [data]
    original = "data/train.npz"      # original training data: .npz (inputs, labels) or "module:function"
    test = "data/test.npz"           # the original test set (same forms): the gate's "must not lose" half
    samples = ["exports/week48"]     # folders written by `edge-sdk data export` (labelled rows are used)
    holdout_fraction = 0.3           # of the labelled samples, held out (by sha256) as the drifted holdout
    max_original = 0                 # use at most this many original rows (0: all), first rows
    min_samples = 1                  # fewer labelled samples than this fails the gather step
    export_fleet = "shop"            # also export this fleet's labelled samples from [registry] db at run time
    export_since = "30d"             #   (edge_sdk.fleet.samples.export_samples: the collector's sample store)
    wait_for_samples = "0s"          #   an alert-triggered run: export again until min_samples are labelled, up to this

    [train]
    entry = "retrain_fashion:train"  # module:function(data, current_model, **params) -> model (required)
    path = ["examples"]              # folders added to sys.path for the entry point and "module:function" data
    params = { epochs = 1 }          # keyword arguments of the entry point

    [convert]
    calibration = "gathered"         # int8 calibration inputs: "gathered" (the training data) or a .npy path
    calib_samples = 300
    val_samples = 500                # validation inputs (with labels); they are also the new version's drift baseline
    baseline = "samples"             # validate (and take the baseline) on the labelled device samples, the data the
                                     #   fleet sees now; "holdouts": the drifted holdout + the original test set

    [evaluate]
    min_gain_pp = 1.0                # must beat the current version on the drifted holdout by this (points)
    max_loss_pp = 0.5                # and lose at most this on the original test set

    [sign]
    key = "keys/release.key"         # ed25519 private key (`edge-sdk keys new`); unsigned without it

    [deploy]
    enabled = true
    fleet = "shop"                   # required when enabled
    mqtt = "mqtt://127.0.0.1:1883"
    base_url = "http://collector:8080"   # where devices download bundles (default $EDGE_SDK_BUNDLE_URL)
    stages = "5,100"
    hold = "10m"
    devices = []                     # only these devices (default: the fleet's devices running the model)
    follow = false                   # judge the stages here until the deployment ends (else the collector does)
    follow_timeout = "2h"
    rollback_key = "keys/release.key"
    thresholds = { max_p95_ratio = 1.5 }   # canary health limits (edge_sdk.fleet.lifecycle.canary.Thresholds)

    [triggers]                       # edge-sdk pipeline serve
    on = ["drift", "confidence_drop", "accuracy_drop"]
    fleets = []                      # alerts of these fleets (default: [deploy] fleet, else any)
    cooldown = "10m"                 # after a run ends, alerts within this time start no new run

    [pipeline]
    workdir = "pipeline-runs"        # runs go to <workdir>/<model>/<run id>/ unless --workdir is given
    lock_dir = ""                    # where the per-model lock file lives (default: the registry dir)
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.pipeline.errors import PipelineConfigError
from edge_sdk.tomlfile import read_toml

__all__ = ["ConvertSettings", "DataSettings", "DeploySettings", "EvaluateSettings", "ModelSettings",
           "PipelineConfig", "RegistrySettings", "TrainSettings", "TriggerSettings", "load_config", "parse_config"]

_ENTRY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class ModelSettings:
    """``[model]``."""

    name: str
    current: str = "active"
    source: Path | None = None
    version: str = "auto"


@dataclass(frozen=True)
class RegistrySettings:
    """``[registry]``."""

    db: str
    dir: Path
    trusted_keys: Path | None = None
    allow_unsigned: bool = False


@dataclass(frozen=True)
class DataSettings:
    """``[data]``: ``original`` and ``test`` are a Path (.npz) or a ``module:function`` string."""

    original: Path | str
    test: Path | str
    samples: tuple[Path, ...] = ()
    holdout_fraction: float = 0.3
    max_original: int = 0
    min_samples: int = 1
    export_fleet: str | None = None
    export_since_s: float | None = None
    wait_for_samples_s: float = 0.0


@dataclass(frozen=True)
class TrainSettings:
    """``[train]``."""

    entry: str
    path: tuple[Path, ...] = ()
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConvertSettings:
    """``[convert]``."""

    calibration: str | Path = "gathered"
    calib_samples: int = 300
    val_samples: int = 500
    baseline: str = "samples"


@dataclass(frozen=True)
class EvaluateSettings:
    """``[evaluate]``."""

    min_gain_pp: float = 1.0
    max_loss_pp: float = 0.5


@dataclass(frozen=True)
class DeploySettings:
    """``[deploy]``."""

    enabled: bool = True
    fleet: str | None = None
    mqtt: str = "mqtt://127.0.0.1:1883"
    base_url: str | None = None
    stages: str = "5,100"
    hold_s: float = 600.0
    devices: tuple[str, ...] = ()
    follow: bool = False
    follow_timeout_s: float = 7200.0
    rollback_key: Path | None = None
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TriggerSettings:
    """``[triggers]``."""

    on: tuple[str, ...] = ("drift", "confidence_drop", "accuracy_drop")
    fleets: tuple[str, ...] = ()
    cooldown_s: float = 600.0


@dataclass(frozen=True)
class PipelineConfig:
    """A parsed pipeline.toml (see the module doc for every key)."""

    path: Path | None
    sha256: str
    model: ModelSettings
    registry: RegistrySettings
    data: DataSettings
    train: TrainSettings
    convert: ConvertSettings = ConvertSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    sign_key: Path | None = None
    deploy: DeploySettings = DeploySettings()
    triggers: TriggerSettings = TriggerSettings()
    workdir: Path = Path("pipeline-runs")
    lock_dir: Path | None = None

    def trigger_fleets(self) -> tuple[str, ...]:
        """The fleets whose alerts start a run (empty: any)."""
        if self.triggers.fleets:
            return self.triggers.fleets
        return (self.deploy.fleet,) if self.deploy.fleet else ()


_KEYS: dict[str, set[str]] = {
    "model": {"name", "current", "source", "version"},
    "registry": {"db", "dir", "trusted_keys", "allow_unsigned"},
    "data": {"original", "test", "samples", "holdout_fraction", "max_original", "min_samples", "export_fleet",
             "export_since", "wait_for_samples"},
    "train": {"entry", "path", "params"},
    "convert": {"calibration", "calib_samples", "val_samples", "baseline"},
    "evaluate": {"min_gain_pp", "max_loss_pp"},
    "sign": {"key"},
    "deploy": {"enabled", "fleet", "mqtt", "base_url", "stages", "hold", "devices", "follow", "follow_timeout",
               "rollback_key", "thresholds"},
    "triggers": {"on", "fleets", "cooldown"},
    "pipeline": {"workdir", "lock_dir"},
}
def _thresholds(dp: Any) -> dict[str, float]:
    """``[deploy] thresholds``: canary health limits, keys of :class:`~edge_sdk.fleet.lifecycle.canary.Thresholds`."""
    from edge_sdk.fleet.lifecycle.canary import Thresholds

    t = dp.t.get("thresholds", {})
    known = set(Thresholds.__dataclass_fields__)
    if not isinstance(t, dict) or not all(k in known and isinstance(v, (int, float)) and not isinstance(v, bool)
                                          and v >= 0 for k, v in t.items()):
        raise dp.fail("thresholds", f"must be a table of numbers >= 0 with keys from {', '.join(sorted(known))}")
    return dict(t)


_REQUIRED = {"model": ("name",), "data": ("original", "test"), "train": ("entry",)}


class _Reader:
    """Typed access to one section with errors naming ``file: [section] key``."""

    def __init__(self, where: str, base: Path, section: str, table: dict[str, Any]) -> None:
        self.where, self.base, self.section, self.t = where, base, section, table

    def fail(self, key: str, what: str) -> PipelineConfigError:
        got = self.t.get(key)
        return PipelineConfigError(f"{self.where}: [{self.section}] {key} {what} (got {str(got)[:60]!r})")

    def str(self, key: str, default: str | None = None) -> str | None:
        v = self.t.get(key, default)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise self.fail(key, "must be a non-empty string")
        return v

    def path(self, key: str) -> Path | None:
        v = self.str(key)
        return None if v is None else self.resolve(v)

    def resolve(self, v: str) -> Path:
        p = Path(os.path.expanduser(v))
        return p if p.is_absolute() else (self.base / p)

    def bool(self, key: str, default: bool) -> bool:
        v = self.t.get(key, default)
        if not isinstance(v, bool):
            raise self.fail(key, "must be true or false")
        return v

    def num(self, key: str, default: float, lo: float, hi: float = float("inf"), *, integer: bool = False) -> Any:
        v = self.t.get(key, default)
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or not lo <= v <= hi:
            kind = "a whole number" if integer else "a number"
            raise self.fail(key, f"must be {kind} in [{lo:g}, {hi:g}]")
        return v if integer else float(v)

    def strs(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        v = self.t.get(key, list(default))
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        if not isinstance(v, list) or not all(isinstance(s, str) and s.strip() for s in v):
            raise self.fail(key, "must be a list of strings")
        return tuple(s.strip() for s in v)

    def duration(self, key: str, default: float) -> float:
        v = self.t.get(key, default)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0:
            return float(v)
        m = _DURATION.match(v) if isinstance(v, str) else None
        if not m:
            raise self.fail(key, "must be a duration such as 30s, 10m, 1h (or seconds)")
        return float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]

    def data_source(self, key: str) -> Path | str:
        v = self.str(key)
        assert v is not None  # required keys are checked before
        if _ENTRY.match(v) and not v.lower().endswith(".npz"):
            return v
        if not v.lower().endswith(".npz"):
            raise self.fail(key, "must be an .npz file (arrays inputs, labels) or a module:function")
        return self.resolve(v)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_config(path: str | os.PathLike) -> PipelineConfig:
    """Read and check a pipeline.toml; PipelineConfigError (one line naming the key) when it cannot be used."""
    p = Path(path)
    doc = read_toml(p, kind="pipeline file", missing_hint="check the path of pipeline.toml",
                    error=PipelineConfigError)
    return parse_config(doc, base=p.resolve().parent, where=str(p), sha256=hashlib.sha256(p.read_bytes()).hexdigest(),
                        path=p.resolve())


def parse_config(doc: dict[str, Any], *, base: Path, where: str = "pipeline.toml", sha256: str | None = None,
                 path: Path | None = None) -> PipelineConfig:
    """A :class:`PipelineConfig` from a parsed TOML table (paths relative to ``base``)."""
    for section in doc:
        if section not in _KEYS:
            raise PipelineConfigError(f"{where}: unknown section [{section}]: use {', '.join(sorted(_KEYS))}")
        if not isinstance(doc[section], dict):
            raise PipelineConfigError(f"{where}: {section} must be a [{section}] table")
        for key in doc[section]:
            if key not in _KEYS[section]:
                raise PipelineConfigError(f"{where}: unknown key [{section}] {key}: use one of "
                                          f"{', '.join(sorted(_KEYS[section]))}")
    for section, keys in _REQUIRED.items():
        for key in keys:
            if key not in doc.get(section, {}):
                raise PipelineConfigError(f"{where}: [{section}] {key} is required")

    def r(section: str) -> _Reader:
        return _Reader(where, base, section, doc.get(section, {}))

    m = r("model")
    name = m.str("name")
    if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,99}$", name or ""):
        raise m.fail("name", "must be 1-100 characters of A-Z a-z 0-9 _ . + - (the registry's model name)")
    model = ModelSettings(name=name or "", current=m.str("current", "active") or "active", source=m.path("source"),
                          version=m.str("version", "auto") or "auto")
    g = r("registry")
    registry = RegistrySettings(db=g.str("db", os.environ.get("EDGE_SDK_DB", "sqlite:///fleet.db")) or "",
                                dir=g.path("dir") or base / os.environ.get("EDGE_SDK_REGISTRY", "registry"),
                                trusted_keys=g.path("trusted_keys"), allow_unsigned=g.bool("allow_unsigned", False))
    d = r("data")
    data = DataSettings(original=d.data_source("original"), test=d.data_source("test"),
                        samples=tuple(d.resolve(s) for s in d.strs("samples")),
                        holdout_fraction=d.num("holdout_fraction", 0.3, 0.0, 0.9),
                        max_original=d.num("max_original", 0, 0, 10**9, integer=True),
                        min_samples=d.num("min_samples", 1, 0, 10**9, integer=True),
                        export_fleet=d.str("export_fleet"),
                        export_since_s=d.duration("export_since", 0.0) or None,
                        wait_for_samples_s=d.duration("wait_for_samples", 0.0))
    t = r("train")
    entry = t.str("entry") or ""
    if not _ENTRY.match(entry):
        raise t.fail("entry", "must be module:function, e.g. retrain_fashion:train")
    params = t.t.get("params", {})
    if not isinstance(params, dict) or not all(re.match(r"^[A-Za-z_]\w*$", k) for k in params):
        raise t.fail("params", "must be a table of keyword arguments, e.g. params = { epochs = 1 }")
    train = TrainSettings(entry=entry, path=tuple(t.resolve(s) for s in t.strs("path")), params=dict(params))
    c = r("convert")
    calib = c.str("calibration", "gathered") or "gathered"
    convert = ConvertSettings(calibration=calib if calib == "gathered" else c.resolve(calib),
                              calib_samples=c.num("calib_samples", 300, 1, 100_000, integer=True),
                              val_samples=c.num("val_samples", 500, 1, 100_000, integer=True),
                              baseline=c.str("baseline", "samples") or "samples")
    if convert.baseline not in ("samples", "holdouts"):
        raise c.fail("baseline", "must be \"samples\" or \"holdouts\"")
    e = r("evaluate")
    evaluate = EvaluateSettings(min_gain_pp=e.num("min_gain_pp", 1.0, 0.0, 100.0),
                                max_loss_pp=e.num("max_loss_pp", 0.5, 0.0, 100.0))
    sk = r("sign").path("key")
    dp = r("deploy")
    enabled = dp.bool("enabled", True)
    fleet = dp.str("fleet")
    if enabled and fleet is None:
        raise PipelineConfigError(f"{where}: [deploy] fleet is required when deploy is enabled (or set "
                                  "[deploy] enabled = false)")
    stages = dp.t.get("stages", "5,100")
    if isinstance(stages, list):
        stages = ",".join(str(s) for s in stages)
    if not isinstance(stages, str) or not re.match(r"^\s*\d+(\s*,\s*\d+)*\s*$", stages):
        raise dp.fail("stages", "must be cumulative percentages such as \"5,100\"")
    deploy = DeploySettings(enabled=enabled, fleet=fleet, mqtt=dp.str("mqtt", "mqtt://127.0.0.1:1883") or "",
                            base_url=dp.str("base_url", os.environ.get("EDGE_SDK_BUNDLE_URL")),
                            stages=stages.replace(" ", ""), hold_s=dp.duration("hold", 600.0),
                            devices=dp.strs("devices"), follow=dp.bool("follow", False),
                            follow_timeout_s=dp.duration("follow_timeout", 7200.0),
                            rollback_key=dp.path("rollback_key"), thresholds=_thresholds(dp))
    if deploy.enabled and deploy.base_url is None:
        raise PipelineConfigError(f"{where}: [deploy] base_url is required (where devices download bundles, e.g. "
                                  "http://COLLECTOR:8080), or set $EDGE_SDK_BUNDLE_URL")
    tr = r("triggers")
    triggers = TriggerSettings(on=tr.strs("on", TriggerSettings.on), fleets=tr.strs("fleets"),
                               cooldown_s=tr.duration("cooldown", 600.0))
    pl = r("pipeline")
    return PipelineConfig(path=path, sha256=sha256 or _sha256_text(repr(doc)), model=model, registry=registry,
                          data=data, train=train, convert=convert, evaluate=evaluate, sign_key=sk, deploy=deploy,
                          triggers=triggers, workdir=pl.path("workdir") or base / "pipeline-runs",
                          lock_dir=pl.path("lock_dir"))
