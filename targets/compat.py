"""Compatibility of bundle artifacts with a target profile, checked before anything ships.

:func:`check_artifact` runs every check that applies to one artifact and returns a :class:`CompatReport`
(``ok`` is False when any issue has severity ``error``). Checks:

- candidate: the artifact's format/precision is one the profile lists;
- size: against ``constraints.max_model_size_mb`` (MiB);
- int8 I/O and static shapes, when the profile requires them;
- TFLite: ops that need Flex (select TF) or custom ops, which the plain LiteRT runtime cannot run;
- Edge TPU (``supported_ops = "edgetpu"``): from ``edgetpu_compiler``'s log when the compiler is on PATH,
  otherwise from the documented op set in :mod:`edge_sdk.targets.edgetpu_ops` — each op that would run on
  the CPU is named with the reason (float tensors, dynamic shape, unsupported op, after the first unmapped op);
- ORT: the operators a reduced ONNX Runtime build needs (the ``required_operators.config`` side file),
  and the ``.ort`` layout (amd64 / arm) against the target's;
- Core ML: the oldest OS the package's spec version needs, against the profile's ``min_os``.

This module is device-side safe: it imports no converter and loads LiteRT only to read a .tflite file.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_sdk._deps import require
from edge_sdk.bundle import Artifact, Bundle
from edge_sdk.errors import BundleError, InferenceError
from edge_sdk.targets.edgetpu_ops import check_edgetpu, compile_edgetpu
from edge_sdk.targets.profiles import TargetProfile

__all__ = [
    "CORE_ML_SPEC_OS",
    "CompatIssue",
    "CompatReport",
    "check_artifact",
    "check_bundle",
    "coreml_spec_version",
    "read_required_operators",
    "tflite_graph",
]

# Core ML specification version -> the oldest OS releases that load it
CORE_ML_SPEC_OS: dict[int, dict[str, float]] = {
    4: {"ios": 13, "macos": 10.15}, 5: {"ios": 14, "macos": 11}, 6: {"ios": 15, "macos": 12},
    7: {"ios": 16, "macos": 13}, 8: {"ios": 17, "macos": 14}, 9: {"ios": 18, "macos": 15},
    10: {"ios": 26, "macos": 26},
}
_OS_NAMES = {"ios": "iOS", "macos": "macOS"}
_BUILTIN_OP = re.compile(r"^[A-Z][A-Z0-9_]*$")
_EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
_MIB = 1024 * 1024


@dataclass(frozen=True)
class CompatIssue:
    """One finding. ``error`` makes the artifact incompatible; ``warning`` and ``info`` do not."""

    check: str
    message: str
    severity: str = "error"
    ops: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"check": self.check, "severity": self.severity, "message": self.message, "ops": list(self.ops)}


@dataclass
class CompatReport:
    """Every compatibility finding for one artifact on one target."""

    target: str
    artifact: str
    issues: list[CompatIssue] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no issue is an error."""
        return not self.errors

    @property
    def errors(self) -> list[CompatIssue]:
        """Issues that make the artifact incompatible."""
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[CompatIssue]:
        """Issues worth knowing that do not block shipping."""
        return [i for i in self.issues if i.severity == "warning"]

    def add(self, check: str, message: str, severity: str = "error", ops: tuple[str, ...] | list[str] = ()) -> None:
        """Record one issue."""
        self.issues.append(CompatIssue(check, message, severity, tuple(ops)))

    def summary(self) -> str:
        """One line: ok, or the error messages."""
        if self.ok:
            return f"{self.artifact} on {self.target}: compatible"
        return f"{self.artifact} on {self.target}: " + "; ".join(i.message for i in self.errors)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in manifests by ``edge-sdk build``)."""
        return {"target": self.target, "artifact": self.artifact, "ok": self.ok,
                "issues": [i.to_dict() for i in self.issues], "details": self.details}


# ----------------------------------------------------------------------------- entry points

def check_bundle(profile: TargetProfile, bundle: Bundle) -> list[CompatReport]:
    """Check every artifact of ``bundle`` that is a candidate of ``profile``, in the profile's preference order.

    Raises BundleError when the bundle has none of the artifacts the target can use.
    """
    picked = [a for a in bundle.artifacts if profile.allows(a.format, a.precision)]
    if not picked:
        want = ", ".join(c.key for c in profile.candidates)
        have = ", ".join(a.key for a in bundle.artifacts) or "none"
        raise BundleError(f"bundle {bundle.root} has none of the artifacts target {profile.name!r} needs ({want}); "
                          f"it has: {have}: rebuild with `edge-sdk build SOURCE --target {profile.name}`")
    picked.sort(key=lambda a: profile.rank(a.format, a.precision))
    return [check_artifact(profile, bundle, a) for a in picked]


def check_artifact(profile: TargetProfile, bundle: Bundle, artifact: Artifact, *,
                   edgetpu_out: Path | None = None) -> CompatReport:
    """Run every check that applies to ``artifact`` for ``profile``.

    ``edgetpu_out``: where ``edgetpu_compiler`` writes the compiled model (a temporary folder when None).
    """
    report = CompatReport(profile.name, artifact.key)
    path = bundle.path_of(artifact)
    if not path.exists():
        raise BundleError(f"{artifact.key}: {artifact.path} is missing from bundle {bundle.root}: "
                          "re-fetch or rebuild the bundle")
    if not profile.allows(artifact.format, artifact.precision):
        report.add("candidate", f"{artifact.key} is not a candidate for {profile.name} (candidates: "
                   + ", ".join(c.key for c in profile.candidates) + ")")
    _check_size(profile, artifact, report)
    if artifact.format == "tflite":
        _check_tflite(profile, path, report, edgetpu_out)
    else:
        _check_io(profile, artifact, report)
        if artifact.format == "ort":
            _check_ort(profile, bundle, artifact, report)
        elif artifact.format == "coreml":
            _check_coreml(profile, path, artifact, report)
    if profile.constraints.supported_ops == "edgetpu" and artifact.format != "tflite":
        report.add("edgetpu", f"the Edge TPU runs only .tflite models, not {artifact.format}")
    return report


# ----------------------------------------------------------------------------- generic checks

def _check_size(profile: TargetProfile, artifact: Artifact, report: CompatReport) -> None:
    limit = profile.constraints.max_model_size_mb
    size_mb = artifact.size_bytes / _MIB
    report.details["size_mb"] = round(size_mb, 3)
    if limit and size_mb > limit:
        report.add("size", f"{size_mb:.1f} MiB is over the target's {limit:g} MiB limit")


def _dynamic(shape: Any) -> bool:
    return any(d is None or isinstance(d, str) or int(d) < 0 for d in shape)


def _check_io(profile: TargetProfile, artifact: Artifact, report: CompatReport) -> None:
    """int8 I/O and static shapes from the manifest's tensor specs (non-TFLite formats)."""
    c = profile.constraints
    if c.int8_io_required:
        bad = [f"{t.name} ({t.dtype})" for t in [*artifact.inputs, *artifact.outputs]
               if t.dtype not in ("int8", "uint8")]
        if bad:
            report.add("int8_io", "the target needs int8/uint8 inputs and outputs; these are not: " + ", ".join(bad))
    if c.static_shapes:
        dyn = [f"{t.name} {t.shape}" for t in artifact.inputs if _dynamic(t.shape)]
        if dyn:
            report.add("static_shapes", "the target needs static shapes; dynamic inputs: " + ", ".join(dyn))


# ----------------------------------------------------------------------------- TFLite

def tflite_graph(path: str | Path) -> dict[str, Any]:
    """Ops (execution order, with their tensors), tensors, graph inputs/outputs and constants of a .tflite file."""
    mod = require("ai_edge_litert.interpreter", "litert", "inspecting .tflite files")
    try:
        interp = mod.Interpreter(model_path=str(path))
    except ValueError as exc:
        raise InferenceError(f"cannot read {Path(path).name} as a TFLite model ({str(exc).splitlines()[0]}): "
                             "re-fetch or rebuild the bundle") from None
    tensors = {}
    for t in interp.get_tensor_details():
        tensors[int(t["index"])] = {"name": t["name"], "dtype": t["dtype"].__name__,
                                    "shape": [int(v) for v in t["shape"]],
                                    "shape_signature": [int(v) for v in t.get("shape_signature", t["shape"])]}
    ops = [{"index": int(o["index"]), "name": o["op_name"], "inputs": [int(i) for i in o["inputs"] if i >= 0],
            "outputs": [int(i) for i in o["outputs"] if i >= 0]} for o in interp._get_ops_details()]
    inputs = [int(d["index"]) for d in interp.get_input_details()]
    outputs = [int(d["index"]) for d in interp.get_output_details()]
    produced = set(inputs) | {i for o in ops for i in o["outputs"]}
    constants = {i for o in ops for i in o["inputs"] if i not in produced}
    return {"ops": ops, "tensors": tensors, "inputs": inputs, "outputs": outputs, "constants": constants}


def _check_tflite(profile: TargetProfile, path: Path, report: CompatReport, edgetpu_out: Path | None) -> None:
    graph = tflite_graph(path)
    names = [o["name"] for o in graph["ops"]]
    report.details["ops"] = sorted(set(names))
    flex = sorted({n for n in names if n.startswith("Flex")})
    custom = sorted({n for n in names if not n.startswith("Flex") and not _BUILTIN_OP.match(n)})
    precompiled = _EDGETPU_CUSTOM_OP in custom
    custom = [n for n in custom if n != _EDGETPU_CUSTOM_OP]
    if flex:
        report.add("flex_ops", f"needs Flex (select TF) ops {', '.join(flex)}, which the plain LiteRT runtime "
                   "does not have: replace those operations in the model", ops=flex)
    if custom:
        report.add("custom_ops", f"needs custom ops {', '.join(custom)} that LiteRT does not provide: register "
                   "them in the device runtime or replace them", ops=custom)
    if precompiled and profile.constraints.supported_ops != "edgetpu":
        report.add("custom_ops", "the model is compiled for the Edge TPU (edgetpu-custom-op); this target has "
                   "no Edge TPU: ship the uncompiled .tflite", ops=[_EDGETPU_CUSTOM_OP])
    c = profile.constraints
    tensors = graph["tensors"]
    if c.int8_io_required:
        bad = [f"{tensors[i]['name']} ({tensors[i]['dtype']})" for i in graph["inputs"] + graph["outputs"]
               if tensors[i]["dtype"] not in ("int8", "uint8")]
        if bad:
            report.add("int8_io", "the target needs a full-integer model with int8/uint8 inputs and outputs; "
                       "these are not: " + ", ".join(bad) + ": convert with --precision int8 (int8 I/O)")
    if c.static_shapes:
        dyn = [f"{tensors[i]['name']} {tensors[i]['shape_signature']}" for i in graph["inputs"]
               if _dynamic(tensors[i]["shape_signature"])]
        if dyn:
            report.add("static_shapes", "the target needs static shapes; dynamic inputs: " + ", ".join(dyn)
                       + ": export with a fixed input shape")
    if c.supported_ops == "edgetpu":
        if precompiled:
            report.details["edgetpu"] = {"method": "precompiled"}
            report.add("edgetpu", "already compiled for the Edge TPU (edgetpu-custom-op)", severity="info")
        elif shutil.which("edgetpu_compiler"):
            compile_edgetpu(path, report, edgetpu_out)
        else:
            check_edgetpu(graph, report)


# ----------------------------------------------------------------------------- ORT

def read_required_operators(config: str | Path) -> list[dict[str, Any]]:
    """Parse an ORT ``required_operators.config``: one ``{domain, opsets, ops}`` per line (type info dropped)."""
    entries = []
    for line in Path(config).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(";", 2)
        if len(parts) != 3:
            continue  # global type lines such as "!globally_allowed_types;..."
        domain, opsets, ops_text = parts
        ops_text = re.sub(r"\{[^{}]*(\{[^{}]*\}[^{}]*)*\}", "", ops_text)  # per-op type-reduction JSON
        entries.append({"domain": domain or "ai.onnx", "opsets": [int(v) for v in opsets.split(",") if v.strip()],
                        "ops": sorted(o.strip() for o in ops_text.split(",") if o.strip())})
    return entries


def _check_ort(profile: TargetProfile, bundle: Bundle, artifact: Artifact, report: CompatReport) -> None:
    config = next((bundle.root / f["path"] for f in artifact.files
                   if str(f.get("path", "")).endswith("required_operators.config")), None)
    if config is None and artifact.runtime.get("reduced_build_config"):
        config = bundle.path_of(artifact).with_name(str(artifact.runtime["reduced_build_config"]))
    entries: list[dict[str, Any]] = []
    if config is not None and config.is_file():
        entries = read_required_operators(config)
        report.details["required_operators"] = entries
        report.details["reduced_build_config"] = config.relative_to(bundle.root).as_posix()
    # x86 layout: NCHWc kernels exist only in x86 builds of ONNX Runtime
    nchwc = sorted(f"{e['domain']}:{op}" for e in entries if e["domain"] == "com.microsoft.nchwc" for op in e["ops"])
    layout = artifact.runtime.get("ort_target_platform") or ("amd64" if nchwc else None)
    if layout and layout != profile.ort_target_platform:
        what = f" (it uses the x86-only NCHWc ops {', '.join(nchwc)})" if nchwc else ""
        report.add("ort_layout", f"the .ort file was optimized for {layout}{what}, the target is "
                   f"{profile.ort_target_platform}: rebuild with ort_target_platform={profile.ort_target_platform!r}",
                   ops=nchwc)
    if not entries:
        report.add("ort_ops", "no required_operators.config side file: a reduced ONNX Runtime build cannot be "
                   "configured; rebuild the ORT artifact with edge-sdk", severity="warning")
        return
    ops = sorted({f"{e['domain']}:{op}" if e["domain"] != "ai.onnx" else op for e in entries for op in e["ops"]})
    report.add("ort_ops", f"a reduced ONNX Runtime build needs {len(ops)} operators: {', '.join(ops)} "
               f"(build with --include_ops_by_config {config.name})", severity="info", ops=ops)


# ----------------------------------------------------------------------------- Core ML

def coreml_spec_version(package: str | Path) -> int | None:
    """The spec version of a ``.mlpackage`` read from its protobuf header (no coremltools needed)."""
    pkg = Path(package)
    found = sorted(pkg.rglob("*.mlmodel")) if pkg.is_dir() else [pkg]
    if not found or not found[0].is_file():
        return None
    with open(found[0], "rb") as fh:
        head = fh.read(16)
    if not head or head[0] != 0x08:  # field 1 (specificationVersion), varint, is serialized first
        return None
    value, shift = 0, 0
    for b in head[1:]:
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value
    return None


def _parse_os(text: str) -> tuple[str, float] | None:
    m = re.match(r"^\s*(ios|macos)\s*(\d+(?:\.\d+)?)\s*$", text, re.IGNORECASE)
    return (m.group(1).lower(), float(m.group(2))) if m else None


def _check_coreml(profile: TargetProfile, path: Path, artifact: Artifact, report: CompatReport) -> None:
    checks = artifact.validation.checks or {}
    spec = checks.get("spec_version") or (checks.get("spec") or {}).get("spec_version")
    source = "manifest"
    if spec is None:
        spec, source = coreml_spec_version(path), "package"
    if spec is None:
        report.add("coreml_os", "cannot read the Core ML spec version from the manifest or the package: "
                   "rebuild the Core ML artifact", severity="warning")
        return
    spec = int(spec)
    needs = CORE_ML_SPEC_OS.get(spec)
    report.details["coreml_spec_version"] = spec
    report.details["coreml_spec_source"] = source
    target = _parse_os(profile.constraints.min_os or profile.coreml_minimum_deployment_target)
    if needs is None:
        report.add("coreml_os", f"unknown Core ML spec version {spec}: the oldest OS that loads it is not known",
                   severity="warning")
        return
    report.details["minimum_os"] = {_OS_NAMES[k]: v for k, v in needs.items()}
    if target is None:
        return
    os_name, version = target
    label = f"{_OS_NAMES[os_name]}{needs[os_name]:g}"
    if needs[os_name] > version:
        report.add("coreml_os", f"the package (spec version {spec}) needs {label} or newer, the target supports "
                   f"{_OS_NAMES[os_name]}{version:g}: convert with coreml_minimum_deployment_target="
                   f"'{_OS_NAMES[os_name]}{version:g}' or raise the profile's min_os")
    else:
        report.add("coreml_os", f"the package (spec version {spec}) needs {label} or newer", severity="info")
