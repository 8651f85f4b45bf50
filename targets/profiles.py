"""Target device profiles: one TOML file per device class, loaded into frozen dataclasses.

Search path, later entries overriding earlier ones of the same name:

1. the built-in profiles shipped in ``edge_sdk/targets/profiles/*.toml``;
2. every directory listed in ``$EDGE_SDK_TARGETS`` (separated by ``os.pathsep``), in order.

A profile's name is its file stem (``rpi4.toml`` -> ``rpi4``). ``load_profile`` also takes a path to a
``.toml`` file. A profile may start from another one with ``extends = "NAME"``: tables are merged key by
key, every other value (including arrays such as ``candidates``) replaces the parent's.

File layout (every key is checked; unknown keys are errors so typos do not pass silently)::

    description = "Raspberry Pi 4 (4x Cortex-A72, arm64)"    # required
    arch = "arm64"                                             # required: arm64, x86_64, any
    benchmark_on_host = false                                  # can this host stand in for the device?
    threads = 4                                                # 0 = runtime default
    ort_target_platform = "arm"                                # arm | amd64 (layout of .ort files)
    coreml_minimum_deployment_target = "iOS16"                 # Core ML targets only
    runtimes = ["litert", "onnxruntime"]                       # required, in preference order
    delegates = ["xnnpack"]                                    # in preference order (may be empty)

    [[candidates]]                                             # required, in preference order
    format = "tflite"
    precision = "int8"

    [constraints]
    int8_io_required = false
    static_shapes = true
    supported_ops = ""          # "" = whatever the runtime has; "edgetpu" = the Edge TPU op set
    max_model_size_mb = 0       # 0 = no limit
    min_os = ""                 # e.g. "iOS16" (compared with what a Core ML model needs)

    [accuracy]                  # default budget for choosing among candidates
    max_accuracy_drop_pp = 1.0  # top-1 accuracy (or agreement with the source) drop, percentage points
    min_cosine = 0.99           # minimum cosine similarity of outputs with the source
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk.errors import TargetProfileError
from edge_sdk.formats import Format, Precision
from edge_sdk.runtimes import RUNTIMES  # the runtime registry (live, plugins included) validates `runtimes`
from edge_sdk.tomlfile import read_toml

__all__ = [
    "BUILTIN_DIR",
    "ENV_VAR",
    "AccuracyBudget",
    "Candidate",
    "Constraints",
    "TargetProfile",
    "TargetProfileError",
    "list_profiles",
    "load_profile",
    "profile_paths",
]

BUILTIN_DIR = Path(__file__).resolve().parent / "profiles"
ENV_VAR = "EDGE_SDK_TARGETS"
ARCHES = ("arm64", "x86_64", "any")
ORT_PLATFORMS = ("arm", "amd64")
SUPPORTED_OPS = ("", "edgetpu")
_FIX = f"fix the file, or see the built-in profiles in {BUILTIN_DIR}"


@dataclass(frozen=True)
class Candidate:
    """One artifact variant a target can run: a format at a precision."""

    format: Format
    precision: Precision

    @property
    def key(self) -> str:
        """``format/precision``, the same key bundle artifacts use."""
        return f"{self.format.value}/{self.precision.value}"


@dataclass(frozen=True)
class Constraints:
    """What an artifact must satisfy to run on the target."""

    int8_io_required: bool = False
    static_shapes: bool = False
    supported_ops: str = ""
    max_model_size_mb: float = 0.0
    min_os: str = ""


@dataclass(frozen=True)
class AccuracyBudget:
    """Default accuracy budget: the most a candidate may lose against the source model."""

    max_accuracy_drop_pp: float = 1.0
    min_cosine: float = 0.99


@dataclass(frozen=True)
class TargetProfile:
    """A device class: what to build for it, how to run it, and what an artifact must satisfy."""

    name: str
    description: str
    arch: str
    candidates: tuple[Candidate, ...]
    runtimes: tuple[str, ...]
    delegates: tuple[str, ...] = ()
    constraints: Constraints = field(default_factory=Constraints)
    accuracy: AccuracyBudget = field(default_factory=AccuracyBudget)
    benchmark_on_host: bool = False
    threads: int = 0
    ort_target_platform: str = "arm"
    coreml_minimum_deployment_target: str = ""
    path: Path | None = None
    extends: str = ""

    @property
    def formats(self) -> tuple[Format, ...]:
        """Candidate formats, in preference order, without duplicates."""
        return tuple(dict.fromkeys(c.format for c in self.candidates))

    @property
    def precisions(self) -> tuple[Precision, ...]:
        """Candidate precisions, in preference order, without duplicates."""
        return tuple(dict.fromkeys(c.precision for c in self.candidates))

    def precisions_for(self, fmt: Format | str) -> tuple[Precision, ...]:
        """The precisions listed for one format, in preference order."""
        return tuple(c.precision for c in self.candidates if c.format.value == str(fmt))

    def allows(self, fmt: Format | str, precision: Precision | str) -> bool:
        """True when ``fmt/precision`` is one of the candidates."""
        return any(c.format.value == str(fmt) and c.precision.value == str(precision) for c in self.candidates)

    def rank(self, fmt: Format | str, precision: Precision | str) -> int | None:
        """Preference rank of a candidate (0 = most preferred), None when it is not a candidate."""
        for i, c in enumerate(self.candidates):
            if c.format.value == str(fmt) and c.precision.value == str(precision):
                return i
        return None

    def convert_options(self) -> dict[str, Any]:
        """Keyword arguments for ``ConvertOptions`` that this target implies."""
        opts: dict[str, Any] = {"ort_target_platform": self.ort_target_platform}
        if self.coreml_minimum_deployment_target:
            opts["coreml_minimum_deployment_target"] = self.coreml_minimum_deployment_target
        if self.constraints.int8_io_required:
            opts["tflite_int8_io"] = True
        return opts

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description (for ``edge-sdk targets --json`` and manifests)."""
        c, a = self.constraints, self.accuracy
        return {
            "name": self.name, "description": self.description, "arch": self.arch,
            "candidates": [x.key for x in self.candidates], "runtimes": list(self.runtimes),
            "delegates": list(self.delegates), "benchmark_on_host": self.benchmark_on_host,
            "threads": self.threads, "ort_target_platform": self.ort_target_platform,
            "coreml_minimum_deployment_target": self.coreml_minimum_deployment_target,
            "constraints": {"int8_io_required": c.int8_io_required, "static_shapes": c.static_shapes,
                            "supported_ops": c.supported_ops, "max_model_size_mb": c.max_model_size_mb,
                            "min_os": c.min_os},
            "accuracy": {"max_accuracy_drop_pp": a.max_accuracy_drop_pp, "min_cosine": a.min_cosine},
            "path": str(self.path) if self.path else None,
        }


# ----------------------------------------------------------------------------- search path

def profile_paths() -> dict[str, Path]:
    """Every profile file on the search path by name; a later directory overrides an earlier one."""
    dirs = [BUILTIN_DIR] + [Path(d).expanduser() for d in os.environ.get(ENV_VAR, "").split(os.pathsep) if d]
    found: dict[str, Path] = {}
    for d in dirs:
        if d.is_dir():
            for f in sorted(d.glob("*.toml")):
                found[f.stem] = f
    return found


def list_profiles() -> list[TargetProfile]:
    """Every profile on the search path, loaded and checked, sorted by name."""
    paths = profile_paths()
    return [_load(name, paths, ()) for name in sorted(paths)]


def load_profile(name_or_path: str | os.PathLike) -> TargetProfile:
    """Load a profile by name (search path) or from a ``.toml`` file path."""
    text = os.fspath(name_or_path)
    paths = profile_paths()
    p = Path(text).expanduser()
    if text.endswith(".toml") or os.sep in text or (os.altsep and os.altsep in text):
        if not p.is_file():
            raise TargetProfileError(f"target profile file {p} not found: check the path")
        paths[p.stem] = p
        return _load(p.stem, paths, ())
    if text not in paths:
        known = ", ".join(sorted(paths)) or "none"
        raise TargetProfileError(f"unknown target {text!r}: known targets are {known} (or add {text}.toml to a "
                                 f"directory listed in ${ENV_VAR})")
    return _load(text, paths, ())


# ----------------------------------------------------------------------------- parsing

def _load(name: str, paths: dict[str, Path], chain: tuple[str, ...]) -> TargetProfile:
    return _parse(name, paths[name], _raw_chain(name, paths, chain))


def _raw_chain(name: str, paths: dict[str, Path], chain: tuple[str, ...]) -> dict[str, Any]:
    """The raw table of a profile merged over its ``extends`` chain (parents first)."""
    path = paths[name]
    raw = _read(path)
    if "extends" not in raw:
        return raw
    parent = raw["extends"]
    if not isinstance(parent, str) or not parent:
        raise _err(path, "extends", f"must be a profile name, got {parent!r}")
    if parent in chain or parent == name:
        raise _err(path, "extends", f"profile {parent!r} extends itself through {' -> '.join((*chain, name, parent))}")
    if parent not in paths:
        raise _err(path, "extends", f"unknown target {parent!r}; known targets are {', '.join(sorted(paths))}")
    return _merge(_raw_chain(parent, paths, (*chain, name)), raw)


def _read(path: Path) -> dict[str, Any]:
    return read_toml(path, kind="target profile", missing_hint=_FIX, error=TargetProfileError)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _err(path: Path, fld: str, problem: str) -> TargetProfileError:
    return TargetProfileError(f"target profile {path}: {fld}: {problem}: {_FIX}")


class _Reader:
    """Typed access to one table of a profile, naming the file and the field in every error."""

    def __init__(self, path: Path, table: Any, prefix: str, allowed: set[str]) -> None:
        self.path, self.prefix = path, prefix
        if not isinstance(table, dict):
            raise _err(path, prefix.rstrip("."), f"must be a table, got {type(table).__name__}")
        self.table = table
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise _err(path, prefix + unknown[0], f"unknown key (known keys: {', '.join(sorted(allowed))})")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., choices: tuple = ()) -> Any:
        fld = self.prefix + key
        if key not in self.table:
            if default is ...:
                raise _err(self.path, fld, "missing required field")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise _err(self.path, fld, f"must be {names}, got {value!r}")
        if choices and value not in choices:
            raise _err(self.path, fld, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value

    def strings(self, key: str, default: Any = ..., choices: tuple = ()) -> tuple[str, ...]:
        values = self.get(key, list, default)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise _err(self.path, f"{self.prefix}{key}[{i}]", f"must be a string, got {v!r}")
            if choices and v not in choices:
                raise _err(self.path, f"{self.prefix}{key}[{i}]", f"unknown value {v!r}: choose from "
                           + ", ".join(choices))
        return tuple(values)


_TOP = {"description", "arch", "extends", "benchmark_on_host", "threads", "ort_target_platform",
        "coreml_minimum_deployment_target", "runtimes", "delegates", "candidates", "constraints", "accuracy"}


def _parse(name: str, path: Path, raw: dict[str, Any]) -> TargetProfile:
    top = _Reader(path, raw, "", _TOP)
    cands_raw = top.get("candidates", list)
    if not cands_raw:
        raise _err(path, "candidates", "needs at least one {format, precision} entry")
    candidates: list[Candidate] = []
    for i, entry in enumerate(cands_raw):
        r = _Reader(path, entry, f"candidates[{i}].", {"format", "precision"})
        try:
            fmt = Format.parse(r.get("format", str))
        except ValueError as exc:
            raise _err(path, f"candidates[{i}].format", str(exc)) from None
        try:
            prec = Precision.parse(r.get("precision", str))
        except ValueError as exc:
            raise _err(path, f"candidates[{i}].precision", str(exc)) from None
        cand = Candidate(fmt, prec)
        if cand in candidates:
            raise _err(path, f"candidates[{i}]", f"{cand.key} is listed twice")
        candidates.append(cand)
    runtimes = top.strings("runtimes", choices=RUNTIMES)
    if not runtimes:
        raise _err(path, "runtimes", "needs at least one runtime")
    cr = _Reader(path, raw.get("constraints", {}), "constraints.",
                 {"int8_io_required", "static_shapes", "supported_ops", "max_model_size_mb", "min_os"})
    constraints = Constraints(
        int8_io_required=cr.get("int8_io_required", bool, False),
        static_shapes=cr.get("static_shapes", bool, False),
        supported_ops=cr.get("supported_ops", str, "", SUPPORTED_OPS),
        max_model_size_mb=float(cr.get("max_model_size_mb", (int, float), 0)),
        min_os=cr.get("min_os", str, ""),
    )
    if constraints.max_model_size_mb < 0:
        raise _err(path, "constraints.max_model_size_mb", "must be >= 0 (0 = no limit)")
    ar = _Reader(path, raw.get("accuracy", {}), "accuracy.", {"max_accuracy_drop_pp", "min_cosine"})
    accuracy = AccuracyBudget(
        max_accuracy_drop_pp=float(ar.get("max_accuracy_drop_pp", (int, float), 1.0)),
        min_cosine=float(ar.get("min_cosine", (int, float), 0.99)),
    )
    if not 0 <= accuracy.max_accuracy_drop_pp <= 100:
        raise _err(path, "accuracy.max_accuracy_drop_pp", "must be between 0 and 100 percentage points")
    if not -1 <= accuracy.min_cosine <= 1:
        raise _err(path, "accuracy.min_cosine", "must be between -1 and 1")
    threads = top.get("threads", int, 0)
    if threads < 0:
        raise _err(path, "threads", "must be >= 0 (0 = runtime default)")
    return TargetProfile(
        name=name,
        description=top.get("description", str),
        arch=top.get("arch", str, choices=ARCHES),
        candidates=tuple(candidates),
        runtimes=runtimes,
        delegates=top.strings("delegates", ()),
        constraints=constraints,
        accuracy=accuracy,
        benchmark_on_host=top.get("benchmark_on_host", bool, False),
        threads=threads,
        ort_target_platform=top.get("ort_target_platform", str, "arm", ORT_PLATFORMS),
        coreml_minimum_deployment_target=top.get("coreml_minimum_deployment_target", str, ""),
        path=path,
        extends=raw.get("extends", ""),
    )
