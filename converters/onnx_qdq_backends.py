"""The two static int8 QDQ quantizer backends for ONNX (NNCF and ONNX Runtime's ``quantize_static``) and their
calibration glue: the calibration samples as ORT's data reader / NNCF's dataset, ORT's calibration methods, and
the activation re-typing that lets ORT fuse NNCF's output.
:func:`~edge_sdk.converters.onnx_quantize.quantize_static_qdq` chooses between them; frameworks are imported
inside the functions.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.calibration import SampleSet
from edge_sdk.converters.base import ConvertOptions
from edge_sdk.errors import ConversionError

__all__ = [
    "CALIBRATIONS",
    "calibration_method",
    "calibration_reader",
    "feed_array",
    "nncf_qdq",
    "ort_qdq",
    "retype_activations",
    "weight_format",
]

#: the ORT calibration methods (``options.extra['onnx_calibration']``)
CALIBRATIONS = ("minmax-mean", "minmax", "percentile", "entropy")
#: int8 weight types (``options.extra['onnx_weight_type']``): symmetric int8 ("U8S8" with uint8 activations) or
#: uint8 ("U8U8", ORT's quantizer only; ORT 1.32 per-channel gives them zero point 128, WeightSymmetric=False
#: did not change that)
WEIGHT_TYPES = ("int8", "uint8")
#: default of ``options.extra['onnx_reduce_range']`` (see :func:`weight_format`)
REDUCE_RANGE_DEFAULT = False


def weight_format(options: ConvertOptions) -> tuple[str, bool]:
    """(weight type, reduce range) from ``options.extra['onnx_weight_type']`` and ``['onnx_reduce_range']``.

    ``reduce_range`` stores 7-bit weights (levels -64..64): on x86 CPUs without VNNI, ORT's U8S8 kernels sum
    pairs of uint8 x int8 products in int16 (VPMADDUBSW), which saturates with full-range weights; ORT's
    quantizer then uses ``reduce_range=True`` and NNCF ``overflow_fix=ENABLE`` (its default fixes the first layer only).
    """
    wtype = str(options.extra.get("onnx_weight_type", "int8")).strip().lower()
    if wtype not in WEIGHT_TYPES:
        raise ConversionError(f"onnx_weight_type {wtype!r} is not supported: choose from {', '.join(WEIGHT_TYPES)}")
    reduce = options.extra.get("onnx_reduce_range", REDUCE_RANGE_DEFAULT)
    if not isinstance(reduce, bool):
        raise ConversionError(f"onnx_reduce_range must be true or false, not {reduce!r}")
    return wtype, reduce


def feed_array(x: np.ndarray) -> np.ndarray:
    """A calibration sample as the model takes it: integers (token ids, masks) stay integers, the rest float32."""
    x = np.asarray(x)
    return np.ascontiguousarray(x) if x.dtype.kind in "iub" else np.ascontiguousarray(x, dtype=np.float32)


def calibration_reader(samples: SampleSet, names: list[str]) -> Any:
    """A CalibrationDataReader over ``samples`` feeding the ONNX inputs ``names``."""
    quant = require("onnxruntime.quantization", "onnx", "ONNX static quantization")

    class _SampleReader(quant.CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[list[np.ndarray]] = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self._it, None)
            if item is None:
                return None
            return {n: feed_array(x) for n, x in zip(names, item, strict=True)}

        def rewind(self) -> None:
            self._it = iter(samples)

        def __len__(self) -> int:
            return len(samples)

        def set_range(self, start_index: int, end_index: int) -> None:  # used by CalibStridedMinMax
            self._it = itertools.islice(iter(samples), start_index, end_index)

    return _SampleReader()


def calibration_method(quant: Any, options: ConvertOptions) -> tuple[str, Any, dict[str, Any]]:
    """The calibration method named by ``options.extra['onnx_calibration']`` (default ``minmax-mean``).

    ``minmax-mean`` averages the per-sample min/max of each activation over the calibration set (ORT's
    ``CalibMovingAverage``): on ImageNet MobileNetV2 it cut the logit error about 3x against plain min/max,
    whose ranges are set by the single most extreme sample. ``percentile``/``entropy`` build histograms (slower,
    and on MobileNetV2 they did not beat ``minmax-mean``).
    """
    name = str(options.extra.get("onnx_calibration", "minmax-mean")).strip().lower()
    if name not in CALIBRATIONS:
        raise ConversionError(f"onnx_calibration {name!r} is not supported: choose from {', '.join(CALIBRATIONS)}")
    method = quant.CalibrationMethod
    if name == "minmax-mean":
        return name, method.MinMax, {"CalibMovingAverage": True}
    if name == "minmax":
        return name, method.MinMax, {}
    if name == "percentile":
        pct = float(options.extra.get("onnx_calib_percentile", 99.999))
        return f"percentile-{pct:g}", method.Percentile, {"CalibPercentile": pct, "CalibStridedMinMax": 1}
    return name, method.Entropy, {"CalibStridedMinMax": 1}  # strided: histograms merged per sample, low memory


def retype_activations(path: Path, act: str) -> int:
    """Make every activation Quantize/Dequantize pair ``act`` (uint8/int8) on the same grid (zero point +-128).

    NNCF gives tensors that can be negative (conv outputs without ReLU, residual adds, the input) int8
    quantizers and ReLU outputs uint8 ones; ORT cannot fuse a Conv whose input and output types differ into
    QLinearConv and runs it in float. The shifted quantizer represents exactly the same values.
    Returns how many quantizers were changed.
    """
    onnx = require("onnx", "onnx", "ONNX quantization")
    numpy_helper = require("onnx.numpy_helper", "onnx", "ONNX quantization")
    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    src, dst, shift = ((onnx.TensorProto.INT8, np.uint8, 128) if act == "uint8"
                       else (onnx.TensorProto.UINT8, np.int8, -128))
    changed: set[str] = set()
    outputs: set[str] = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        zp = inits.get(node.input[2])
        if zp is None or (zp.data_type != src and zp.name not in changed):
            continue
        outputs.add(node.output[0])
        if zp.name not in changed:
            shifted = numpy_helper.to_array(zp).astype(np.int16) + shift
            zp.CopyFrom(numpy_helper.from_array(shifted.astype(dst), zp.name))
            changed.add(zp.name)
    if outputs:
        keep = [v for v in graph.value_info if v.name not in outputs]
        del graph.value_info[:]
        graph.value_info.extend(keep)
        onnx.save_model(model, str(path))
    return len(outputs)


def nncf_qdq(pre: Path, out_path: Path, samples: SampleSet, names: list[str], options: ConvertOptions,
             act: str, float_layers: list[str]) -> dict[str, str]:
    """NNCF post-training quantization of the pre-processed ONNX file, laid out for ORT's QDQ fusion.

    MIXED preset (symmetric per-channel int8 weights, asymmetric activations) with full bias correction
    (``fast_bias_correction=False``). Activations are forced per-tensor: NNCF's CPU config gives depthwise
    conv inputs per-channel quantizers, which ORT cannot fuse (measured 36 ms vs 3.7 ms on MobileNetV2). Layers
    whose outputs NNCF left unquantized get output quantizers (converters/onnx_qdq_fusion.py) unless
    ``options.extra['onnx_output_quantizers']`` is False: without them ORT runs those layers in float and dequantizes
    their weights on every call. ``options.extra['onnx_fp16_unfused_convs']`` (off by default: it trades int8 bytes
    for speed) also stores the weights of convs that still cannot fuse as fp16.
    """
    onnx = require("onnx", "onnx", "ONNX quantization")
    nncf = require("nncf", "openvino-convert", "NNCF int8 quantization of ONNX models")
    adv = require("nncf.quantization.advanced_parameters", "openvino-convert", "NNCF int8 quantization")
    calib = str(options.extra.get("onnx_calibration", "minmax-mean")).strip().lower()
    ranges = {"minmax-mean": "MEAN_MINMAX", "minmax": "MINMAX"}
    if calib not in ranges:
        raise ConversionError(f"onnx_calibration {calib!r} is not supported with onnx_quantizer 'nncf': choose "
                              f"from {', '.join(ranges)}, or set onnx_quantizer to 'ort'")
    estimators = require("nncf.quantization.range_estimator", "openvino-convert", "NNCF int8 quantization")
    wtype, reduce = weight_format(options)
    if wtype != "int8":
        raise ConversionError(f"onnx_weight_type {wtype!r} needs onnx_quantizer 'ort' (NNCF makes int8 weights)")
    params = adv.AdvancedQuantizationParameters(
        overflow_fix=adv.OverflowFix.ENABLE if reduce else adv.OverflowFix.FIRST_LAYER,
        activations_quantization_params=adv.QuantizationParameters(per_channel=False),
        weights_quantization_params=adv.QuantizationParameters(per_channel=options.onnx_per_channel),
        activations_range_estimator_params=getattr(estimators.RangeEstimatorParametersSet, ranges[calib]))
    data = [{n: feed_array(x) for n, x in zip(names, item, strict=True)} for item in samples]
    nncf.set_log_level(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF draws progress bars; the pipeline reports itself
            quantized = nncf.quantize(
                onnx.load(str(pre)), nncf.Dataset(data), preset=nncf.QuantizationPreset.MIXED,
                target_device=nncf.TargetDevice.CPU, subset_size=len(data), fast_bias_correction=False,
                ignored_scope=nncf.IgnoredScope(names=float_layers, validate=False) if float_layers else None,
                advanced_parameters=params)
    except (RuntimeError, ValueError, KeyError, nncf.ValidationError, nncf.InternalError,
            nncf.UnsupportedModelError) as exc:
        raise ConversionError(f"NNCF int8 quantization failed ({exc}): set ConvertOptions.extra "
                              "onnx_quantizer='ort' or use precision 'dynamic'") from exc
    onnx.save_model(quantized, str(out_path))
    retyped = retype_activations(out_path, act)
    info = {"nncf": nncf.__version__, "onnx_calibration": f"nncf-{calib}+bias-correction",
            "onnx_retyped_activations": str(retyped), "onnx_weight_type": wtype,
            "onnx_reduce_range": "all layers" if reduce else "first layer (nncf default)"}
    if options.extra.get("onnx_output_quantizers", True):
        from edge_sdk.converters.onnx_qdq_fusion import fold_unfused_conv_weights, quantize_layer_outputs

        info["onnx_output_quantizers"] = str(quantize_layer_outputs(out_path, data, act))
        if options.extra.get("onnx_fp16_unfused_convs", False):
            info["onnx_float_convs_fp16_weights"] = str(fold_unfused_conv_weights(out_path))
    return info


class _AxisNoise(logging.Filter):
    """Drops ONNX Runtime's "Axis 1 is out-of-range for weight ..." root-logger warnings (that 1-D weight is
    quantized per tensor, as it should be); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


def ort_qdq(pre: Path, out_path: Path, samples: SampleSet, names: list[str], options: ConvertOptions,
            act: str, float_layers: list[str]) -> dict[str, str]:
    """ONNX Runtime ``quantize_static`` of the pre-processed ONNX file."""
    quant = require("onnxruntime.quantization", "onnx", "ONNX static quantization")
    calib_name, calib_method, extra = calibration_method(quant, options)
    act_types = {"uint8": quant.QuantType.QUInt8, "int8": quant.QuantType.QInt8,
                 "uint16": quant.QuantType.QUInt16, "int16": quant.QuantType.QInt16}
    if act.endswith("16"):  # 16-bit Q/DQ needs opset 21 or ORT's com.microsoft Q/DQ ops
        extra = {**extra, "UseQDQContribOps": True}
    wtype, reduce = weight_format(options)
    root = logging.getLogger()
    quiet = _AxisNoise()
    root.addFilter(quiet)  # per-channel on a 1-D weight (a BatchNorm scale) logs one root WARNING per tensor
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its calibrator prints "Collecting tensor data ..."
            quant.quantize_static(
                str(pre), str(out_path), calibration_reader(samples, names),
                quant_format=quant.QuantFormat.QDQ,
                per_channel=options.onnx_per_channel,
                activation_type=act_types[act],
                weight_type=quant.QuantType.QUInt8 if wtype == "uint8" else quant.QuantType.QInt8,
                reduce_range=reduce,
                calibrate_method=calib_method,
                nodes_to_exclude=float_layers,
                extra_options=extra,
            )
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConversionError(f"ONNX static int8 quantization failed ({exc}): check the calibration data "
                              "matches the model inputs, or use precision 'dynamic'") from exc
    finally:
        root.removeFilter(quiet)
    return {"onnx_calibration": calib_name, "onnx_weight_type": wtype,
            "onnx_reduce_range": "all layers" if reduce else "no"}
