"""The TensorFlow Lite converter, run in a child process: ``python -m edge_sdk.converters.tflite_converter_child
REQUEST.json``.

The converter is native code that can crash the process (a Keras 2 bidirectional LSTM made it SIGSEGV inside
``flatbuffer_export`` during full-integer quantization). In a child, a crash costs that one artifact: the parent
(:mod:`edge_sdk.converters.keras_to_tflite`) reports the signal as the artifact's reason and the other artifacts
ship. The request names the SavedModel, the precision, the calibration samples (``.npz``) and where to write; the
child writes the ``.tflite`` or a JSON error (kind, message, Flex / custom op names) next to it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _convert(req: dict[str, Any]) -> bytes:
    import numpy as np
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(req["saved_model"])
    precision = req["precision"]
    if precision == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
        with np.load(req["samples"], allow_pickle=False) as z:
            arrays = [z[f"input_{k}"] for k in range(len(req["input_names"]))]
        names, by_name = req["input_names"], req["by_name"]

        def representative() -> Any:
            for i in range(arrays[0].shape[0]):
                sample = [a[i:i + 1] for a in arrays]
                yield dict(zip(names, sample, strict=True)) if by_name else sample

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if req["int8_io"]:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    return converter.convert()


def main(argv: list[str]) -> int:
    """Run one conversion request; exit 0 with the .tflite or a JSON error written, nonzero only on a crash."""
    req = json.loads(Path(argv[0]).read_text())
    out, err_path = Path(req["out"]), Path(req["error"])
    try:
        out.write_bytes(_convert(req))
    except Exception as exc:  # reported to the parent, which turns it into the artifact's one-line reason
        from edge_sdk.converters.keras_to_tflite import _converter_errors, _unsupported_ops

        flex, custom = _unsupported_ops(exc) if isinstance(exc, _converter_errors()) else ([], [])
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        err_path.write_text(json.dumps({"type": type(exc).__name__, "message": (lines or [type(exc).__name__])[0][:300],
                                        "flex": flex, "custom": custom}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
