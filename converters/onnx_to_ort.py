"""ONNX -> ORT format (``.ort``) for ONNX Runtime mobile / minimal builds.

Runs ``python -m onnxruntime.tools.convert_onnx_models_to_ort`` on the ONNX artifact of the same
precision. ``--target_platform`` comes from ``ConvertOptions.ort_target_platform``: the portable
default layout measured 3x slower on x86, so ``amd64`` is used for x86 devices and ``arm`` for ARM.
The tool's ``required_operators.config`` is kept as a side file for building a reduced runtime.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from edge_sdk._deps import has_module, require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, check_precision, register
from edge_sdk.converters.onnx_common import output_tail, run_tool
from edge_sdk.converters.onnx_quantize import OnnxExporter
from edge_sdk.errors import ConversionError, MissingDependencyError
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["REDUCED_BUILD_CONFIG", "OnnxToOrt"]

REDUCED_BUILD_CONFIG = "required_operators.config"
_PLATFORMS = ("amd64", "arm")
_TIMEOUT_S = 600


def convert_to_ort(onnx_path: Path, out_dir: Path, target_platform: str) -> tuple[Path, Path | None]:
    """Convert one ONNX file in ``out_dir``; return the .ort file and the required-operators config."""
    if target_platform not in _PLATFORMS:
        raise ConversionError(f"ort_target_platform {target_platform!r} is not supported: choose from "
                              f"{', '.join(_PLATFORMS)}")
    if not has_module("onnxruntime.tools"):  # importing it pulls torch in: only look for it
        raise MissingDependencyError("onnxruntime", "onnx", "converting ONNX to the ORT format")
    src_dir = out_dir / "in"
    src_dir.mkdir(parents=True, exist_ok=True)
    model = src_dir / "model.onnx"  # the tool converts every .onnx in a folder: give it exactly one
    shutil.copyfile(onnx_path, model)
    cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", "--output_dir",
           str(out_dir / "out"), "--optimization_style", "Fixed", "--target_platform", target_platform, str(model)]
    run_tool(cmd, timeout_s=_TIMEOUT_S,
             failed=lambda exc: f"ONNX -> ORT conversion failed (exit {exc.returncode}): {output_tail(exc.stderr)}: "
                                "check the ONNX model loads in onnxruntime",
             timed_out=f"ONNX -> ORT conversion took over {_TIMEOUT_S} s: check the model size")
    found = sorted((out_dir / "out").rglob("*.ort"))
    if not found:
        raise ConversionError(f"ONNX -> ORT conversion wrote no .ort file in {out_dir / 'out'}: "
                              "check the onnxruntime tools installation")
    configs = sorted((out_dir / "out").rglob("*.config"))
    return found[0], (configs[0] if configs else None)


@register
class OnnxToOrt:
    """ONNX artifact (any source) -> ``.ort`` with its reduced-build operator config."""

    sources = (Framework.PYTORCH, Framework.KERAS, Framework.ONNX, Framework.TFLITE)
    target = Format.ORT
    precisions = (Precision.FP32, Precision.FP16, Precision.DYNAMIC, Precision.INT8)
    budget_ladder = OnnxExporter.budget_ladder  # the .ort is made from the ONNX artifact: same rungs
    extra_options = OnnxExporter.extra_options

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Produce the ``.ort`` artifact of ``precision`` from ``ctx.onnx(precision)``."""
        check_precision(self, precision)
        ort = require("onnxruntime", "onnx", "converting ONNX to the ORT format")
        base = ctx.onnx(precision)
        platform = ctx.options.ort_target_platform.strip().lower()
        ort_file, config = convert_to_ort(base.path, ctx.scratch(f"ort_{precision.value}"), platform)
        out = ctx.path_for(Format.ORT, precision, ".ort")
        shutil.copyfile(ort_file, out)
        files: list[Path] = []
        runtime: dict[str, object] = {"runtime": "onnxruntime", "ort_target_platform": platform}
        if config is not None:
            side = out.with_name(f"{precision.value}.{REDUCED_BUILD_CONFIG}")
            # the tool records its scratch path in a comment: name the bundled artifact instead
            lines = [f"# - {out.name}" if ln.startswith("# - ") else ln for ln in config.read_text().splitlines()]
            side.write_text("\n".join(lines) + "\n")
            files.append(side)
            runtime["reduced_build_config"] = side.name
        notes = [f"ORT format, optimization style Fixed, target platform {platform}; made from the "
                 f"{precision.value} ONNX artifact"]
        if out.stat().st_size > 1.5 * base.path.stat().st_size:
            notes.append("ORT's CPU graph optimizations expanded the weights (fp16 folded back to fp32): this .ort "
                         "file is larger than its ONNX source; ship the .onnx for size")
        if platform == "amd64":
            notes.append("amd64 layout: use ort_target_platform='arm' for ARM devices")
        return [ArtifactDraft(format=Format.ORT, precision=precision, path=out,
                              tool_versions={**base.tool_versions, "onnxruntime": ort.__version__},
                              runtime=runtime, notes=notes, input_layout=base.input_layout, files=files)]
