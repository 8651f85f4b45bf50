"""The Edge TPU's documented operator set and model requirements, used when ``edgetpu_compiler`` is absent.

Source: Coral, "TensorFlow models on the Edge TPU" (coral.ai/docs/edgetpu/models-intro), sections
"Model requirements" and "Supported operations" (compiler / runtime 16). Requirements there:

- tensor parameters are quantized to 8 bits (int8 or uint8); int32 is allowed only for biases and
  shape/axis operands;
- tensor sizes are constant at compile time (no dynamic shapes);
- tensors have at most 3 dimensions larger than 1 (only the 3 innermost dimensions may exceed 1);
- only the operations below are used. The compiler maps ops to the Edge TPU up to the first one it
  cannot map; that op and every op after it run on the CPU.

The table maps TFLite builtin op names to the known limitation the docs give for each. A model that meets
these rules may still have ops the compiler keeps on the CPU (for example a large ResizeBilinear): only
``edgetpu_compiler`` gives the final word, and :mod:`edge_sdk.targets.compat` uses it when it is on PATH.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

__all__ = [
    "EDGETPU_ALLOWED_DTYPES",
    "EDGETPU_MAX_DIMS",
    "EDGETPU_OPS",
    "EDGETPU_SOURCE",
    "EDGETPU_SRAM_MB",
    "attach_compiled",
    "check_edgetpu",
    "compile_edgetpu",
    "op_blockers",
    "parse_compiler_log",
]

EDGETPU_SOURCE = "https://coral.ai/docs/edgetpu/models-intro/#supported-operations"

# tensor element types the Edge TPU executes (int32 only for biases / shape operands)
EDGETPU_ALLOWED_DTYPES = frozenset({"int8", "uint8", "int32"})
EDGETPU_MAX_DIMS = 3  # dimensions allowed to be larger than 1 (the innermost ones)
EDGETPU_SRAM_MB = 8.0  # on-chip parameter cache; larger models stream weights from host memory each run

EDGETPU_OPS: dict[str, str] = {
    "ADD": "",
    "AVERAGE_POOL_2D": "no fused activation function",
    "CONCATENATION": "no fused activation; a constant input must be all zeros and the only other input",
    "CONV_2D": "same dilation in x and y",
    "DEPTHWISE_CONV_2D": "same dilation in x and y",
    "EXPAND_DIMS": "",
    "FULLY_CONNECTED": "default weights format only; one-dimensional output",
    "L2_NORMALIZATION": "",
    "LOGISTIC": "",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "unidirectional LSTM only",
    "LSTM": "unidirectional LSTM only",
    "MAXIMUM": "",
    "MAX_POOL_2D": "no fused activation function",
    "MEAN": "no reduction in the batch dimension; a z-reduction needs a multiple of 4 channels",
    "MINIMUM": "",
    "MUL": "",
    "PACK": "no packing in the batch dimension",
    "PAD": "no padding in the batch dimension",
    "PRELU": "alpha must be one-dimensional",
    "QUANTIZE": "",
    "REDUCE_MAX": "not on the batch dimension",
    "REDUCE_MIN": "not on the batch dimension",
    "RELU": "",
    "RELU6": "",
    "RELU_N1_TO_1": "",
    "RESHAPE": "some reshapes of large tensors are not mapped",
    "RESIZE_BILINEAR": "3-D input/output; large sizes may stay on the CPU",
    "RESIZE_NEAREST_NEIGHBOR": "3-D input/output; large sizes may stay on the CPU",
    "RSQRT": "",
    "SLICE": "",
    "SOFTMAX": "1-D input of at most 16,000 elements",
    "SPACE_TO_DEPTH": "",
    "SPLIT": "no splitting in the batch dimension",
    "SQUEEZE": "only when the squeezed input has at most 3 dimensions larger than 1",
    "STRIDED_SLICE": "",
    "SUB": "",
    "SUM": "no reduction in the batch dimension",
    "SQUARED_DIFFERENCE": "",
    "TANH": "",
    "TRANSPOSE": "",
    "TRANSPOSE_CONV": "",
}


# ----------------------------------------------------------------------------- checks


def _float_like(dtype: str) -> bool:
    return dtype not in EDGETPU_ALLOWED_DTYPES


def op_blockers(op: dict[str, Any], graph: dict[str, Any]) -> list[str]:
    """Why one op (from :func:`edge_sdk.targets.compat.tflite_graph`) cannot run on the Edge TPU; empty if it can."""
    tensors, constants = graph["tensors"], graph["constants"]
    reasons = []
    if op["name"] not in EDGETPU_OPS:
        reasons.append("unsupported op")
    ids = op["inputs"] + op["outputs"]
    bad = sorted({tensors[i]["dtype"] for i in ids if _float_like(tensors[i]["dtype"])})
    if bad:
        reasons.append(f"{'/'.join(bad)} tensors (needs int8/uint8)")
    if any(d < 0 for i in ids for d in tensors[i]["shape_signature"]):
        reasons.append("dynamic shape")
    for i in ids:
        if i not in constants and sum(1 for d in tensors[i]["shape"][:-EDGETPU_MAX_DIMS] if d > 1):
            reasons.append(f"tensor {tensors[i]['name']} {tensors[i]['shape']} has more than {EDGETPU_MAX_DIMS} "
                           "dimensions larger than 1")
            break
    return reasons


def check_edgetpu(graph: dict[str, Any], report: Any) -> None:
    """Judge every op against the documented Edge TPU rules; add one issue naming each op that stays on the CPU.

    The compiler maps one contiguous run of ops: everything after the first op it cannot map runs on the CPU,
    even supported ops, so those are listed too ("after X").
    """
    cpu: list[tuple[str, str]] = []
    mapped: list[str] = []
    first_blocked: str | None = None
    for op in graph["ops"]:
        reasons = op_blockers(op, graph)
        if reasons:
            cpu.append((op["name"], ", ".join(reasons)))
            if mapped and first_blocked is None:
                first_blocked = op["name"]
        elif first_blocked is not None:
            cpu.append((op["name"], f"after the unmapped {first_blocked} (the compiler maps one contiguous segment)"))
        else:
            mapped.append(op["name"])
    _report(report, "documented op list", len(graph["ops"]), cpu)


def _report(report: Any, method: str, total: int, cpu: list[tuple[str, str]]) -> None:
    report.details["edgetpu"] = {"method": method, "ops_total": total, "ops_on_cpu": len(cpu),
                                 "cpu_ops": [{"op": n, "reason": r} for n, r in cpu]}
    if cpu:
        names = list(dict.fromkeys(n for n, _ in cpu))
        listed = "; ".join(f"{n}: {r}" for n, r in cpu[:12]) + ("; ..." if len(cpu) > 12 else "")
        reasons = " ".join(r for _, r in cpu)
        fixes = (["quantize the whole model to int8 with int8 I/O"] if "tensors" in reasons else []) \
            + (["export with a fixed input shape"] if "dynamic" in reasons else []) \
            + (["replace the unsupported ops"] if "unsupported" in reasons else [])
        report.add("edgetpu", f"{len(cpu)} of {total} ops would run on the CPU instead of the Edge TPU ({method}): "
                   f"{listed}: {', '.join(fixes) or 'see the compiler log'}", ops=names)
    else:
        report.add("edgetpu", f"all {total} ops map to the Edge TPU ({method})", severity="info")


_LOG_LINE = re.compile(r"^([A-Za-z][A-Za-z0-9_-]*)\s+(\d+)\s+(\S.*?)\s*$")


def parse_compiler_log(text: str) -> list[tuple[str, int, str]]:
    """(op, count, status) rows of ``edgetpu_compiler -s`` output ("Mapped to Edge TPU" or the reason it is not)."""
    rows = []
    in_table = False
    for line in text.splitlines():
        if re.match(r"^\s*Operator\s+Count\s+Status", line):
            in_table = True
            continue
        m = _LOG_LINE.match(line.strip()) if in_table else None
        if m:
            rows.append((m.group(1), int(m.group(2)), m.group(3)))
    return rows


def compile_edgetpu(path: Path, report: Any, out_dir: Path | None = None, timeout: int = 300) -> Path | None:
    """Run ``edgetpu_compiler`` on ``path``; name the ops it keeps on the CPU; return the compiled file (if kept)."""
    compiler = shutil.which("edgetpu_compiler")
    if compiler is None:
        raise FileNotFoundError("edgetpu_compiler is not on PATH")
    keep = out_dir is not None
    work = Path(out_dir) if keep else Path(tempfile.mkdtemp(prefix="edgetpu_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([compiler, "-s", "-o", str(work), str(path)], check=True, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.CalledProcessError as exc:
        tail = " | ".join(ln.strip() for ln in ((exc.stderr or "") + (exc.stdout or "")).splitlines()
                          if ln.strip())[-400:]
        report.add("edgetpu", f"edgetpu_compiler rejected the model (exit {exc.returncode}): {tail}")
        return None
    except subprocess.TimeoutExpired:
        report.add("edgetpu", f"edgetpu_compiler took over {timeout} s: check the model size")
        return None
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    rows = parse_compiler_log(proc.stdout)
    cpu = [(op, status) for op, count, status in rows if not status.startswith("Mapped to Edge TPU")
           for _ in range(count)]
    _report(report, "edgetpu_compiler", sum(c for _, c, _ in rows), cpu)
    report.details["edgetpu"]["compiler_log"] = proc.stdout.strip().splitlines()[-40:]
    report.details["edgetpu"]["op_mapping"] = [{"op": op, "count": count, "status": status}
                                               for op, count, status in rows]
    version = re.search(r"Edge TPU Compiler version\s+(\S+)", proc.stdout)
    if version:
        report.details["edgetpu"]["compiler_version"] = version.group(1)
    compiled = work / f"{Path(path).stem}_edgetpu.tflite"
    if keep and compiled.is_file():
        report.details["edgetpu"]["compiled"] = str(compiled)
        return compiled
    return None


def attach_compiled(bundle: Any, artifact: Any, compiled: Path, details: dict[str, Any]) -> dict[str, Any]:
    """Ship ``edgetpu_compiler``'s output beside the int8 ``artifact`` it was compiled from (issue 16).

    The compiled file goes into the bundle next to the artifact as ``<stem>_edgetpu.tflite`` and is recorded as a
    side file (hashed, so ``Bundle.verify`` checks it) and in ``artifact.runtime["edgetpu"]``: its path, the
    delegate it needs (``edgetpu``) and the compiler's op mapping. The plain int8 file stays the artifact: it runs
    everywhere, and the agent loads the compiled one instead only where ``libedgetpu`` is present. Returns the
    ``runtime["edgetpu"]`` entry. The bundle's manifest is not saved here.
    """
    from edge_sdk.bundle import sha256_path

    src = bundle.path_of(artifact)
    dest = src.with_name(f"{src.stem}_edgetpu.tflite")
    if Path(compiled).resolve() != dest.resolve():
        shutil.copyfile(compiled, dest)
    rel = dest.relative_to(bundle.root).as_posix()
    side = {"path": rel, "sha256": sha256_path(dest), "size_bytes": dest.stat().st_size, "role": "edgetpu"}
    artifact.files = [f for f in artifact.files if f.get("path") != rel] + [side]
    entry = {"path": rel, "delegate": "edgetpu", "op_mapping": list(details.get("op_mapping", [])),
             "ops_on_cpu": details.get("ops_on_cpu"), "ops_total": details.get("ops_total")}
    if details.get("compiler_version"):
        entry["compiler_version"] = details["compiler_version"]
    artifact.runtime["edgetpu"] = entry
    note = f"{rel}: compiled by edgetpu_compiler; the agent runs it where libedgetpu is installed"
    if note not in artifact.notes:
        artifact.notes.append(note)
    return entry

