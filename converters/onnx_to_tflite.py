"""ONNX -> TFLite (LiteRT) with ``onnx2tf`` 1.28.8 (extra ``onnx2tf``), run as a subprocess.

onnx2tf rewrites its input file in place, so it always gets a copy in a scratch directory. It converts
channel-first inputs to **NHWC** (the artifact's ``input_layout``; the permutation is in the runtime hints).
It would download a sample ``.npy`` for RGB inputs (for its own checks and for int8 calibration): we place
our own file under that name in its working directory and pass our calibration data with ``-cind``, so it
never touches the network.

Precisions: ``fp32`` / ``fp16`` (its float32 / float16 outputs), ``dynamic`` (``-odrqt``) and ``int8``
(``-oiqt -qt per-channel``; full integer with int8 I/O, or float I/O when ``tflite_int8_io`` is False).
One onnx2tf run serves several precisions: outputs are cached per work directory.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_sdk._deps import has_module
from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, check_precision, register
from edge_sdk.converters.keras_to_tflite import (
    TFLiteConverter,
    check_builtin_ops,
    tflite_draft,
    tflite_summary,
    version_of,
)
from edge_sdk.converters.onnx_common import run_tool
from edge_sdk.converters.onnx_ml_lowering import check_lowered
from edge_sdk.converters.shims import apply_shims, explain, tf_safe_node_names
from edge_sdk.errors import ConversionError, MissingDependencyError, UnsupportedConversionError
from edge_sdk.formats import Format, Framework, Precision

__all__ = ["NCHW_TO_NHWC", "OnnxToTFLite", "channels_last"]

NCHW_TO_NHWC = (0, 2, 3, 1)
_SAMPLE_NPY = "calibration_image_sample_data_20x128x128x3_float32.npy"  # the name onnx2tf would download
_TIMEOUT_S = 1800
_OUTPUT = {
    Precision.FP32: "model_float32.tflite",
    Precision.FP16: "model_float16.tflite",
    Precision.DYNAMIC: "model_dynamic_range_quant.tflite",
}


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_HELP = ("Read this and deal with it", "Alternatively, if the input OP", "If the input OP of ONNX",
         "Also, for models that include", "The trace log is below", "input_onnx_file_path")


def _tail(text: str, n: int = 6) -> str:
    """The useful part of onnx2tf's output: the node it failed on and the exception, not its generic advice."""
    lines = [_ANSI.sub("", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and "I0000" not in ln and "W0000" not in ln and not any(h in ln for h in _HELP)]
    node = next((ln.split("onnx_op_name:", 1)[1].strip() for ln in lines if "onnx_op_name:" in ln), None)
    errors = [ln for ln in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln)]
    detail = errors[-1] if errors else " | ".join(lines[-n:])
    if errors and "Exception encountered when calling layer" in detail:  # Keras wraps the real message: add it
        after = lines[lines.index(errors[-1]) + 1:]
        if after and not after[0].startswith("Call arguments"):
            detail = f"{detail} {after[0]}"
    detail = detail[:400]
    if node:
        detail = f"at node {node}: {detail}"
    return detail or "no output"


def _run_onnx2tf(model: Path, workdir: Path, flags: list[str]) -> Path:
    """Run onnx2tf on a copy of ``model`` in ``workdir``; return its output folder."""
    shutil.copyfile(model, workdir / "model.onnx")
    if "onnx2tf-scope-names" in apply_shims("onnx2tf"):
        tf_safe_node_names(workdir / "model.onnx")
    # onnx2tf loads this file from its cwd instead of downloading it (RGB inputs): give it harmless data
    if not (workdir / _SAMPLE_NPY).exists():
        np.save(workdir / _SAMPLE_NPY, np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))
    cmd = [sys.executable, "-m", "onnx2tf", "-i", "model.onnx", "-o", "out", "-n", *flags]
    run_tool(cmd, cwd=workdir, timeout_s=_TIMEOUT_S, failed=_failure,
             timed_out=f"onnx2tf did not finish in {_TIMEOUT_S} s: the model may be too large for onnx2tf; use "
                       "another target")
    return workdir / "out"


def _failure(exc: subprocess.CalledProcessError) -> str:
    """onnx2tf's one-line reason: a crash by signal, a known tool bug (shims.py), or the node it failed on."""
    if exc.returncode < 0:  # killed by a signal: a crash inside TensorFlow / onnx2tf, not a Python error
        try:
            sig = signal.Signals(-exc.returncode).name
        except ValueError:
            sig = f"signal {-exc.returncode}"
        return (f"onnx2tf crashed ({sig}) converting the model: {_tail(exc.stderr + exc.stdout, 2)}: use another "
                "target or --route")
    known = explain("onnx2tf", exc.stderr + exc.stdout)
    return (f"onnx2tf failed (exit {exc.returncode}): {_tail(exc.stderr + exc.stdout)}: "
            + (f"{known}" if known else "check the model with onnx.checker, or use another target"))


def channels_last(ndim: int) -> tuple[int, ...] | None:
    """The permutation onnx2tf applies to a channel-first input of ``ndim`` dims (NCW->NWC, NCHW->NHWC, ...)."""
    return (0, *range(2, ndim), 1) if ndim >= 3 else None


def _calibration_flags(ctx: ConversionContext, samples: SampleSet, workdir: Path) -> list[str]:
    """-cind arguments: our calibration samples, transposed to NHWC where onnx2tf transposes the input."""
    flags: list[str] = ["-qt", "per-channel"]
    for k, (name, arr) in enumerate(zip(ctx.source.input_names, samples.arrays, strict=True)):
        perm = channels_last(arr.ndim) if _channel_first(ctx) else None
        data = np.ascontiguousarray(arr.transpose(perm)) if perm else arr
        path = workdir / f"calib_{k}.npy"
        np.save(path, data.astype(np.float32))
        flags += ["-cind", name, path.name, "[0.0]", "[1.0]"]  # our samples are already normalized
    return flags


def _channel_first(ctx: ConversionContext) -> bool:
    """onnx2tf assumes channel-first inputs; inputs that are already channels-last must keep their shape."""
    return ctx.source.layout == "NCHW"


def _keep_shape_flags(ctx: ConversionContext) -> list[str]:
    """``-kat`` (keep shape absolutely) for sources that are not channel-first, e.g. NHWC ONNX from Keras."""
    return [] if _channel_first(ctx) else ["-kat", *ctx.source.input_names]


def _cache_dir(ctx: ConversionContext, key: str, digest: str) -> tuple[Path, bool]:
    """A per-work-directory scratch folder for one onnx2tf run; True when it already holds a finished run."""
    d = ctx.workdir / "_scratch" / f"onnx2tf_{key}"
    stamp = d / "done.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("digest") == digest:
        return d, True
    return ctx.scratch(f"onnx2tf_{key}"), False


def _digest(model: Path, samples: SampleSet | None) -> str:
    h = hashlib.sha256(model.read_bytes())
    for arr in samples.arrays if samples is not None else []:
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:16]


@register
class OnnxToTFLite(TFLiteConverter):
    """ONNX models -> .tflite through onnx2tf (NHWC inputs)."""

    sources = (Framework.ONNX,)

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Run onnx2tf (once per work directory and kind) and pick the file of ``precision``."""
        check_precision(self, precision)
        for mod in ("onnx2tf", "tensorflow", "onnx_graphsurgeon", "tf_keras"):
            if not has_module(mod):
                raise MissingDependencyError(mod, "onnx2tf", "converting ONNX models to TFLite")
        src = ctx.source
        check_lowered(src)  # an ai.onnx.ml op that could not be lowered: its reason, not onnx2tf's
        model = Path(src.model)  # never modified: onnx2tf gets a copy
        int8_io = bool(ctx.options.tflite_int8_io)
        notes: list[str] = []
        samples = None
        if precision is Precision.INT8:
            if draft := self.aeq_or_note(ctx, "onnx2tf's int8", notes):
                return [draft]
            samples = ctx.require_calibration("TFLite int8 quantization of an ONNX model (onnx2tf)")
            samples.check(src.input_shapes, "calibration")
            digest = _digest(model, samples)
            workdir, done = _cache_dir(ctx, "int8", digest)
            flags = ["-oiqt", *_calibration_flags(ctx, samples, workdir), *_keep_shape_flags(ctx)]
            name = "model_full_integer_quant.tflite" if int8_io else "model_integer_quant.tflite"
            notes.append(f"full integer (per-channel weights), calibrated on {len(samples)} samples; "
                         + ("int8 inputs/outputs" if int8_io else "float32 inputs/outputs"))
        else:
            digest = _digest(model, None)
            workdir, done = _cache_dir(ctx, "float", digest)
            flags = ["-odrqt", *_keep_shape_flags(ctx)]
            name = _OUTPUT[precision]
        if not done:
            _run_onnx2tf(model, workdir, flags)
            (workdir / "done.json").write_text(json.dumps({"digest": digest}))
        produced = workdir / "out" / name
        if not produced.is_file():
            raise UnsupportedConversionError(f"onnx2tf did not produce {name} for {precision.value}: this model "
                                             "cannot be converted at that precision; try fp32 or another target")
        out = ctx.path_for(Format.TFLITE, precision, ".tflite")
        shutil.copyfile(produced, out)
        versions = {"onnx2tf": version_of("onnx2tf"), "tensorflow": version_of("tensorflow-cpu", "tensorflow"),
                    "ai-edge-litert": version_of("ai-edge-litert")}
        if precision is Precision.INT8:
            self.delegable_int8(ctx, out, notes, versions)
        summary = tflite_summary(out)
        check_builtin_ops(summary, "onnx2tf")
        perms: list[list[int] | None] = []
        for t, shape in zip(summary["inputs"], src.input_shapes, strict=False):
            perm = channels_last(len(shape))
            got = list(t["shape"])
            if got == list(shape) or perm is None:
                perms.append(None)
            elif got == [shape[i] for i in perm]:
                perms.append(list(perm))
            else:
                raise ConversionError(f"onnx2tf changed input {t['name']!r} from {list(shape)} to {got} in a way "
                                      "edge-sdk cannot map: use another target for this model")
        layout = "NHWC" if src.layout == "NCHW" and perms and perms[0] == list(NCHW_TO_NHWC) else None
        extra: dict = {}
        if any(perms):
            extra = {"input_permutations": perms, "source_input_layout": src.layout or None}
            if layout:
                extra.update(input_layout=layout, input_permutation=list(NCHW_TO_NHWC))
            notes.append("onnx2tf made the inputs channels-last: transpose source inputs with "
                         + ", ".join(str(tuple(p)) for p in perms if p))
        return [tflite_draft(out, precision, summary, src.input_names, notes, versions, input_layout=layout,
                             extra_runtime=extra)]
