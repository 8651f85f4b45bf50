"""Structural checks of a saved Core ML ``.mlpackage``, done on any OS (no Core ML runtime needed).

Core ML models only run on macOS / iOS, so on other hosts a converter cannot validate the package
numerically. What it can do is read the package's protobuf spec and check that it says what was
asked: an ML program, the right inputs / outputs and shapes, a spec version the requested
deployment target can load, and weights actually stored in the requested precision (fp32 / fp16
``const`` tensors, int8 ``constexpr_affine_dequantize`` / ``constexpr_blockwise_shift_scale``, or
``constexpr_lut_to_dense`` palettes).

Image models also get an ``ImageType`` input built from the manifest's preprocessing (:func:`image_input_for`,
:func:`image_type`): the tensor the agent computes is ``(pixel * scale - mean) / std`` per channel, which is
``pixel * (scale / std) + (-mean / std)``. Core ML's ``ImageType`` documents one scale; with a per-channel std
the scale is passed as a per-channel (3, 1, 1) constant, so coremltools' preprocessing pass emits the exact
normalisation as the program's first two ops (``mul`` then ``add``) and nothing is folded or approximated.
:func:`check_package` reads those ops back and compares them with the manifest's math, and checks the classifier
labels and the metadata (:func:`describe_model`) the Vision / Xcode side reads.
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import sys
import warnings
from collections.abc import Sequence
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.bundle import size_of
from edge_sdk.converters.base import ArtifactDraft
from edge_sdk.converters.shims import SHIMS, apply_shims
from edge_sdk.errors import ConversionError, UnsupportedConversionError
from edge_sdk.formats import Precision
from edge_sdk.runtimes.coreml import INPUTS_KEY, ImageInput, image_inputs

if TYPE_CHECKING:
    from edge_sdk.converters.model_card import ModelCard

__all__ = [
    "LINUX_SKIP_REASON",
    "check_package",
    "check_palette_bits",
    "compress_and_save",
    "compress_program",
    "compute_precision",
    "deployment_target",
    "describe_model",
    "finish_draft",
    "image_input_for",
    "image_type",
    "import_coremltools",
    "inspect_package",
    "numeric_validation_skip_reason",
    "shim_notes",
]

LINUX_SKIP_REASON = ("Core ML numeric validation needs macOS (coremltools predict is macOS-only); "
                     "the package spec was checked instead")

# MIL DataType enum values (coremltools/proto/MIL.proto)
_MIL_DTYPES = {1: "bool", 2: "string", 10: "fp16", 11: "fp32", 12: "fp64", 13: "bf16", 21: "int8", 22: "int16",
               23: "int32", 24: "int64", 25: "int4", 31: "uint8", 32: "uint16", 33: "uint32", 34: "uint64",
               35: "uint4", 36: "uint2", 37: "uint1", 38: "uint6", 39: "uint3", 40: "fp8e4m3", 41: "fp8e5m2"}
_FLOATS = {"fp16", "fp32", "fp64", "bf16"}
# multiArrayType data types (FeatureTypes.proto ArrayFeatureType.ArrayDataType)
_ARRAY_DTYPES = {65568: "float32", 65552: "float16", 65600: "float64", 131104: "int32", 131080: "int8"}
# Core ML spec version -> the oldest OS that loads it
_SPEC_VERSION_OS = {4: "iOS13", 5: "iOS14", 6: "iOS15", 7: "iOS16", 8: "iOS17", 9: "iOS18", 10: "iOS26"}
_QUANT_OPS = {"constexpr_affine_dequantize": "quantized_data", "constexpr_blockwise_shift_scale": "data"}
_MIN_WEIGHT_SHARE = 0.5  # int8 / palettized: at least half of the weight elements must be compressed
_VISION_CROP = {"center_crop": "centerCrop", "stretch": "scaleFill"}  # VNImageCropAndScaleOption per resize_mode


def import_coremltools() -> Any:
    """Import coremltools (import-time chatter silenced) with the known-bug shims of ``shims.py`` applied.

    Every Core ML path imports coremltools through here, so no conversion runs on an unshimmed tool.
    """
    if "coremltools" in sys.modules:
        apply_shims("coremltools")
        return sys.modules["coremltools"]
    log = io.StringIO()
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with redirect_stdout(log), redirect_stderr(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ct = require("coremltools", "coreml", "Core ML conversion")
            apply_shims("coremltools")
            return ct
    finally:
        logger.setLevel(level)


def shim_notes(frontend: str) -> list[str]:
    """Artifact notes naming the coremltools shims in effect for ``frontend`` ("pytorch", "tensorflow")."""
    names = apply_shims("coremltools", frontend=frontend)
    if not names:
        return []
    issues = {s.name: s.issue for s in SHIMS}
    return ["coremltools shims applied: " + ", ".join(f"{n} ({issues[n]})" for n in names)]


def deployment_target(name: str) -> Any:
    """``"iOS16"`` -> ``ct.target.iOS16``; unknown names raise UnsupportedConversionError listing choices."""
    ct = import_coremltools()
    wanted = name.strip().lower()
    for target in ct.target:
        if target.name.lower() == wanted:
            return target
    raise UnsupportedConversionError(f"unknown Core ML deployment target {name!r}: choose from "
                                     + ", ".join(t.name for t in ct.target))


def numeric_validation_skip_reason() -> str | None:
    """Why Core ML numeric validation cannot run on this host, or None on macOS."""
    return None if sys.platform == "darwin" else LINUX_SKIP_REASON


def _dims(tensor_type: Any) -> list[int | None]:
    return [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tensor_type.dimensions]


def _feature(desc: Any, images: dict[str, ImageInput] | None = None) -> dict[str, Any]:
    kind = desc.type.WhichOneof("Type")
    if images and desc.name in images:
        img = images[desc.name]
        return {"name": desc.name, "kind": kind, "shape": img.shape, "dtype": "float32", "color": img.color,
                "layout": img.layout, "scale": list(img.scale), "bias": list(img.bias)}
    if kind != "multiArrayType":
        return {"name": desc.name, "kind": kind, "shape": None, "dtype": None}
    arr = desc.type.multiArrayType
    return {"name": desc.name, "kind": kind, "shape": [int(s) for s in arr.shape],
            "dtype": _ARRAY_DTYPES.get(arr.dataType, str(arr.dataType))}


def _param_type(op: Any, key: str, consts: dict[str, Any]) -> Any | None:
    """Tensor type of a constexpr parameter: an attribute (iOS16/17) or an input binding (iOS18+)."""
    if key in op.attributes:
        return op.attributes[key].type.tensorType
    if key in op.inputs and op.inputs[key].arguments:
        arg = op.inputs[key].arguments[0]
        if arg.WhichOneof("binding") == "value":
            return arg.value.type.tensorType
        return consts.get(arg.name)
    return None


def _count(tensor_type: Any) -> int:
    return math.prod(d or 1 for d in _dims(tensor_type))


def _weights(spec: Any) -> dict[str, dict[str, Any]]:
    """Weight tensors of the main function, grouped by how they are stored."""
    func = spec.mlProgram.functions["main"]
    block = func.block_specializations[func.opset]
    consts = {op.outputs[0].name: op.outputs[0].type.tensorType for op in block.operations if op.type == "const"}
    consumed: set[str] = set()  # consts feeding a constexpr op are parts of a compressed weight
    for op in block.operations:  # or the image input's scale / bias (fp32: they act on the fp32 image)
        if op.type.startswith("constexpr_") or (op.outputs and op.outputs[0].name.endswith(("__scaled__",
                                                                                            "__biased__"))):
            for arg in op.inputs.values():
                consumed.update(a.name for a in arg.arguments if a.WhichOneof("binding") == "name")
    groups: dict[str, dict[str, Any]] = {}

    def add(kind: str, elements: int, **extra: Any) -> None:
        g = groups.setdefault(kind, {"tensors": 0, "elements": 0})
        g["tensors"] += 1
        g["elements"] += elements
        for k, v in extra.items():
            g.setdefault(k, [])
            if v not in g[k]:
                g[k].append(v)

    for op in block.operations:
        out = op.outputs[0].type.tensorType if op.outputs else None
        if op.type == "const":
            dtype = _MIL_DTYPES.get(out.dataType, str(out.dataType))
            if dtype in _FLOATS and out.rank >= 1 and op.outputs[0].name not in consumed:
                add(dtype, _count(out))
        elif op.type in _QUANT_OPS:
            data = _param_type(op, _QUANT_OPS[op.type], consts)
            dtype = _MIL_DTYPES.get(data.dataType, "?") if data is not None else "?"
            add(dtype, _count(out), op=op.type)
        elif op.type == "constexpr_lut_to_dense":
            lut = _param_type(op, "lut", consts)
            dims = _dims(lut) if lut is not None else []
            # iOS16/17: lut is [2^n]; iOS18+: lut is [..., 2^n, vector_size]
            entries = (dims[-2] if len(dims) >= 2 else dims[0]) if dims else 0
            add("palettized", _count(out), nbits=int(math.log2(entries)) if entries else None)
        elif op.type.startswith("constexpr_"):
            add(op.type.removeprefix("constexpr_"), _count(out))
    return groups


def inspect_package(path: str | Path) -> dict[str, Any]:
    """Read a saved ``.mlpackage`` without compiling it: model type, spec version, I/O and weight storage."""
    ct = import_coremltools()
    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise ConversionError(f"{path} is not a Core ML package (no Manifest.json): re-run the Core ML conversion")
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConversionError(f"cannot read Core ML package {path} ({exc}): re-run the Core ML conversion") from None
    spec = model.get_spec()
    model_type = spec.WhichOneof("Type")
    images = image_inputs(spec)
    desc = spec.description
    meta = desc.metadata
    info: dict[str, Any] = {
        "model_type": model_type,
        "spec_version": int(spec.specificationVersion),
        "minimum_os": _SPEC_VERSION_OS.get(int(spec.specificationVersion), "unknown"),
        "inputs": [_feature(d, images) for d in desc.input],
        # tensors only: a classifier's label / probability-dictionary outputs are described under "classifier"
        "outputs": [_feature(d) for d in desc.output if d.type.WhichOneof("Type") == "multiArrayType"],
        "size_bytes": size_of(path),
        "metadata": {"author": meta.author, "license": meta.license, "version": meta.versionString,
                     "description": meta.shortDescription,
                     "user_defined": {k: v for k, v in meta.userDefined.items() if k.startswith("edge_sdk.")}},
    }
    if desc.predictedFeatureName:
        labels = _classifier_labels(spec)
        info["classifier"] = {"predicted_feature": desc.predictedFeatureName,
                              "probabilities": desc.predictedProbabilitiesName, "classes": len(labels),
                              "labels": labels}
    if model_type == "mlProgram":
        func = spec.mlProgram.functions["main"]
        info["opset"] = func.opset
        info["weights"] = _weights(spec)
    return info


def _classifier_labels(spec: Any) -> list[str]:
    """The class labels of the program's ``classify`` op (what Vision reports as identifiers)."""
    func = spec.mlProgram.functions["main"]
    block = func.block_specializations[func.opset]
    for op in block.operations:
        if op.type == "classify" and op.inputs["classes"].arguments:
            arg = op.inputs["classes"].arguments[0]
            items = arg.value.immediateValue.list.values
            out = []
            for v in items:
                t = v.immediateValue.tensor
                out.extend(str(x) for x in (t.strings.values if t.WhichOneof("value") == "strings"
                                            else t.longInts.values))
            return out
    return []


def image_input_for(pre: Any, name: str, shape: Sequence[int], layout: str) -> ImageInput | None:
    """The ``ImageInput`` that reproduces ``pre`` (a :class:`Preprocessing`) on a 4-D input, or None when the input
    is not an image the preprocessing describes (wrong rank, channel count or layout, no size)."""
    if pre is None or not pre.size or len(shape) != 4 or layout not in ("NCHW", "NHWC") or pre.layout != layout:
        return None
    n = 1 if pre.color == "GRAY" else 3
    c, h, w = (shape[1], shape[2], shape[3]) if layout == "NCHW" else (shape[3], shape[1], shape[2])
    if c != n or (h, w) != tuple(pre.size) or int(shape[0]) != 1:
        return None
    mean = list(pre.mean) * n if len(pre.mean) == 1 else list(pre.mean)
    std = list(pre.std) * n if len(pre.std) == 1 else list(pre.std)
    if len(mean) != n or len(std) != n:
        return None
    scale = tuple(float(pre.scale) / float(s) for s in std)
    bias = tuple(-float(m) / float(s) for m, s in zip(mean, std, strict=True))
    return ImageInput(name, pre.color, int(h), int(w), scale, bias, layout)


def image_type(ct: Any, img: ImageInput) -> Any:
    """The ``ct.ImageType`` for ``img``: one scale when every channel shares it, else a (3, 1, 1) per-channel
    constant (coremltools' preprocessing pass emits it as the program's first ``mul``; exact, nothing folded)."""
    same = len(set(img.scale)) == 1
    scale: Any = img.scale[0] if same else [[[s]] for s in img.scale]
    bias: Any = img.bias[0] if img.color == "GRAY" else list(img.bias)
    color = {"RGB": ct.colorlayout.RGB, "BGR": ct.colorlayout.BGR, "GRAY": ct.colorlayout.GRAYSCALE}[img.color]
    return ct.ImageType(name=img.name, shape=tuple(img.shape), scale=scale, bias=bias, color_layout=color,
                        channel_first=img.layout == "NCHW")


def describe_model(mlmodel: Any, card: ModelCard, image: ImageInput | None, frontend: str) -> None:
    """Author / licence / version / description, feature descriptions and the preprocessing (for Xcode, Vision and
    anyone matching the agent by hand) written into the model's metadata."""
    mlmodel.author, mlmodel.license = card.author_or_default, card.license_or_default
    mlmodel.version, mlmodel.short_description = card.version, card.summary
    user = mlmodel.user_defined_metadata
    user["com.github.apple.coremltools.source"] = frontend  # a classifier passes through MIL: name the real source
    user["edge_sdk.name"], user["edge_sdk.task"] = card.name, card.task
    pre = card.preprocessing
    if pre is not None:
        user["edge_sdk.preprocessing"] = json.dumps(pre.to_dict(), sort_keys=True)
    if image is not None:
        user[INPUTS_KEY] = json.dumps({image.name: {"layout": image.layout, "shape": image.shape}})
        crop = pre.resize_mode if pre is not None else "stretch"
        user["edge_sdk.vision.imageCropAndScaleOption"] = _VISION_CROP[crop]
        if pre is not None and crop == "center_crop":
            user["edge_sdk.vision.note"] = (f"the agent crops the central {pre.crop_fraction:.1%} of the short side "
                                            "and Vision's centerCrop the whole short side: crop the frame to that "
                                            "fraction first for identical inputs")
    spec = mlmodel.get_spec()
    for f in spec.description.input:
        mlmodel.input_description[f.name] = (
            f"{image.color} image {image.width}x{image.height}; Core ML computes pixel*scale+bias per channel = "
            "the manifest's (pixel*scale-mean)/std" if image is not None and f.name == image.name
            else "float32 tensor as the manifest's inputs describe")
    for f in spec.description.output:
        mlmodel.output_description[f.name] = {
            "stringType": "most likely class label", "int64Type": "most likely class",
            "dictionaryType": "probability of each class label"}.get(
                f.type.WhichOneof("Type"), "float32 tensor (the source model's output; the agent reads it)")


def _check_image(problems: list[str], got: dict[str, Any], want: ImageInput) -> None:
    """The image input Core ML will build equals the manifest's preprocessing (colour, size, scale, bias)."""
    if got.get("kind") != "imageType":
        problems.append(f"input {want.name!r} is a {got.get('kind')}, expected an image")
        return
    _expect(problems, got["color"] == want.color, f"image input colour is {got['color']}, the manifest has "
            f"{want.color}")
    for key in ("scale", "bias"):
        ok = len(got[key]) == len(getattr(want, key)) and np.allclose(got[key], getattr(want, key), rtol=1e-6,
                                                                       atol=1e-6)
        _expect(problems, ok, f"image input {key} is {got[key]}, the manifest's preprocessing gives "
                f"{list(getattr(want, key))}")


def _expect(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def check_package(
    path: str | Path,
    precision: Precision,
    *,
    input_names: Sequence[str] | None,
    input_shapes: Sequence[Sequence[int]],
    output_shapes: Sequence[Sequence[int]] | None = None,
    output_names: Sequence[str] | None = None,
    target: str = "iOS16",
    image: ImageInput | None = None,
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Inspect the package and compare it with the request; return the checks for ``ArtifactDraft.spec_checks``.

    ``image``: the image input the manifest's preprocessing implies (else every input must be a tensor);
    ``labels``: the class labels a classifier package must carry.

    Every contradiction is collected, then one ConversionError lists them all.
    """
    info = inspect_package(path)
    problems: list[str] = []
    _expect(problems, info["model_type"] == "mlProgram", f"model type is {info['model_type']}, expected mlProgram")
    want_version = deployment_target(target).value
    _expect(problems, info["spec_version"] <= want_version,
            f"spec version {info['spec_version']} needs {info['minimum_os']}, newer than the requested {target}")
    ins, outs = info["inputs"], info["outputs"]
    _expect(problems, len(ins) == len(input_shapes), f"{len(ins)} inputs, the source has {len(input_shapes)}")
    for i, (got, shape) in enumerate(zip(ins, input_shapes, strict=False)):
        _expect(problems, got["shape"] == [int(s) for s in shape],
                f"input {got['name']!r} has shape {got['shape']}, the source has {list(shape)}")
        if input_names is not None and i < len(input_names):
            _expect(problems, got["name"] == input_names[i],
                    f"input {i} is named {got['name']!r}, the source calls it {input_names[i]!r}")
        if image is not None and got["name"] == image.name:
            _check_image(problems, got, image)
        else:
            _expect(problems, got["kind"] == "multiArrayType", f"input {got['name']!r} is a {got['kind']}, "
                    "expected a tensor")
    classifier = info.get("classifier")
    if labels is not None:
        _expect(problems, classifier is not None and classifier["labels"] == list(labels),
                f"the package should classify into the {len(labels)} labels but has "
                f"{classifier['classes'] if classifier else 'no classifier'}")
    else:
        _expect(problems, classifier is None, "the package is a classifier but no labels were asked for")
    if output_shapes is not None:
        _expect(problems, len(outs) == len(output_shapes), f"{len(outs)} outputs, the source has {len(output_shapes)}")
        for got, shape in zip(outs, output_shapes, strict=False):
            _expect(problems, got["shape"] == [int(s) for s in shape],
                    f"output {got['name']!r} has shape {got['shape']}, the source gives {list(shape)}")
    if output_names is not None and len(output_names) == len(outs):
        for got, name in zip(outs, output_names, strict=True):
            _expect(problems, got["name"] == name, f"output is named {got['name']!r}, the source calls it {name!r}")

    weights = info.get("weights", {})
    elements = {k: g["elements"] for k, g in weights.items()}
    total = sum(elements.values())
    _expect(problems, total > 0, "the ML program holds no weight tensors")
    if precision is Precision.FP32:
        _expect(problems, elements.get("fp32", 0) > 0 and elements.get("fp16", 0) == 0,
                f"fp32 was asked but the weights are stored as {sorted(elements)}")
    elif precision is Precision.FP16:
        _expect(problems, elements.get("fp16", 0) > 0 and elements.get("fp32", 0) == 0,
                f"fp16 was asked but the weights are stored as {sorted(elements)}")
    elif precision in (Precision.INT8, Precision.PALETTIZED):
        kind = "int8" if precision is Precision.INT8 else "palettized"
        share = elements.get(kind, 0) / total if total else 0.0
        info["compressed_share"] = round(share, 4)
        _expect(problems, share >= _MIN_WEIGHT_SHARE,
                f"{precision.value} was asked but only {share:.0%} of the weight elements are {kind} "
                f"(storage: {elements})")
    if problems:
        raise ConversionError(f"Core ML package {Path(path).name} does not match the {precision.value} request: "
                              + "; ".join(problems) + ": report this with the source model attached")
    info["passed"] = True
    return info


def finish_draft(draft: ArtifactDraft, checks: dict[str, Any]) -> ArtifactDraft:
    """Attach the spec checks and, off macOS, the reason numeric validation is skipped."""
    draft.spec_checks = checks
    draft.validation_skipped = numeric_validation_skip_reason()
    return draft


def compute_precision(precision: Precision) -> Any:
    """The ``ct.convert`` compute precision: fp32 only for fp32; fp16 under int8 / palettized weights."""
    ct = import_coremltools()
    return ct.precision.FLOAT32 if precision is Precision.FP32 else ct.precision.FLOAT16


def check_palette_bits(bits: int) -> None:
    """Raise UnsupportedConversionError unless ``bits`` is a palette size Core ML supports."""
    if bits not in (1, 2, 3, 4, 6, 8):
        raise UnsupportedConversionError(f"Core ML palettization supports 1, 2, 3, 4, 6 or 8 bits, not {bits}: "
                                         "set coreml_palette_bits to one of them")


def _compression(precision: Precision, palette_bits: int) -> tuple[str, Any, str] | None:
    """(coremltools compression pass, its config, the artifact note) for ``precision``; None for fp32 / fp16."""
    import_coremltools()
    cto = require("coremltools.optimize.coreml", "coreml", "Core ML weight compression")
    if precision is Precision.INT8:
        return ("compression::linear_quantize_weights",
                cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric",
                                                                                 dtype="int8")),
                "int8 linear symmetric per-channel weights, fp16 compute; activations stay fp16 (no calibration used)")
    if precision is Precision.PALETTIZED:
        check_palette_bits(palette_bits)
        return ("compression::palettize_weights",
                cto.OptimizationConfig(global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=palette_bits)),
                f"{palette_bits}-bit k-means palettized weights (per tensor), fp16 compute")
    return None


def compress_program(prog: Any, precision: Precision, *, palette_bits: int) -> list[str]:
    """Compress the weights of a MIL program in place (the pass ``linear_quantize_weights`` / ``palettize_weights``
    run): used before a classifier is added, since coremltools 9 cannot re-export a classifier it re-loaded."""
    how = _compression(precision, palette_bits)
    if how is None:
        return []
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    graph_pass = PASS_REGISTRY[how[0]]
    graph_pass.set_options([PassOption("config", how[1]), PassOption("joint_compression", False)])
    with redirect_stderr(io.StringIO()):  # progress bars
        graph_pass.apply(prog)
    return [how[2]]


def compress_and_save(mlmodel: Any, precision: Precision, out: Path, *, palette_bits: int,
                      compressed: bool = False) -> list[str]:
    """Quantize / palettize the weights of an fp16 ML program as ``precision`` asks (unless ``compressed``
    already), save it, return notes. The converters compress on MIL (compress_program) instead: re-exporting a
    saved model fuses an ``ImageType``'s scale / bias ops into a ``batch_norm`` (epsilon 1e-5)."""
    how = None if compressed else _compression(precision, palette_bits)
    notes: list[str] = []
    if how is not None:
        cto = require("coremltools.optimize.coreml", "coreml", "Core ML weight compression")
        compress = cto.linear_quantize_weights if precision is Precision.INT8 else cto.palettize_weights
        with redirect_stderr(io.StringIO()):  # progress bars
            mlmodel = compress(mlmodel, config=how[1])
        notes.append(how[2])
    if out.exists():
        shutil.rmtree(out)
    mlmodel.save(str(out))
    return notes
