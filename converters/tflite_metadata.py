"""TFLite Metadata (labels, normalization, tensor descriptions) written into a shipped ``.tflite`` file.

Android Studio's ML Model Binding, the TFLite Task Library and MediaPipe Tasks read a model's description from
the TFLite Metadata flatbuffer inside the file, not from the bundle's manifest. :func:`annotate_tflite` writes it
with MediaPipe's maintained writer (``mediapipe.tasks.python.metadata.metadata_writers``; the older
``tflite-support`` package is archived), after the artifact passed validation and was copied into the bundle:

- general info: name, version, description, author, licence (converters/model_card.py);
- the input: an image input with ``NormalizationOptions`` when the manifest's preprocessing describes the
  model's single NHWC input (TFLite normalises pixel values, so mean / std are the manifest's divided by its
  ``scale``: ``(p*scale - m)/s == (p - m/scale)/(s/scale)`` exactly), else a feature input whose description
  spells the preprocessing out;
- the outputs: for a classifier with labels, a classification output with ``labels.txt`` associated
  (TENSOR_AXIS_LABELS), else feature outputs.

Metadata only adds a buffer and associated files: the graph is untouched. That is checked here on a zero input
with LiteRT (outputs bit-identical before and after) when LiteRT is installed, and the artifact's sha256 and
size are computed again after the rewrite. The agent keeps reading the manifest; the metadata is for the
vendors' tool-chains. A writer failure never fails the artifact: it ships without metadata and a note says why.
"""

from __future__ import annotations

import importlib
import io
import shutil
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import has_module
from edge_sdk.bundle import Artifact, sha256_path
from edge_sdk.converters.model_card import ModelCard
from edge_sdk.errors import ConversionError, first_line
from edge_sdk.formats import Format

__all__ = ["annotate_tflite", "normalization_for", "write_metadata"]

_WRITERS = "mediapipe.tasks.python.metadata.metadata_writers"


def normalization_for(pre: Any) -> tuple[list[float], list[float]]:
    """TFLite ``NormalizationOptions`` (mean, std on 0-255 pixel values) equal to the manifest's preprocessing."""
    n = 1 if pre.color == "GRAY" else 3
    mean = list(pre.mean) * n if len(pre.mean) == 1 else list(pre.mean)
    std = list(pre.std) * n if len(pre.std) == 1 else list(pre.std)
    return [float(m) / float(pre.scale) for m in mean], [float(s) / float(pre.scale) for s in std]


def _preprocessing_text(pre: Any) -> str:
    return (f"{pre.color} image {pre.size[1]}x{pre.size[0]} ({pre.resize_mode}), (pixel*{pre.scale:g} - mean)/std "
            f"with mean={list(pre.mean)} std={list(pre.std)}, layout {pre.layout}")


def _is_image_input(pre: Any, shape: list[int], n_inputs: int) -> bool:
    """The single NHWC input the preprocessing describes (what the Task Library's image input expects)."""
    if pre is None or not pre.size or n_inputs != 1 or len(shape) != 4:
        return False
    return [shape[1], shape[2], shape[3]] == [pre.size[0], pre.size[1], 1 if pre.color == "GRAY" else 3]


def _writer_modules() -> tuple[Any, Any, Any]:
    """MediaPipe's metadata_writer, metadata_info and writer_utils (MediaPipe is installed with --no-deps: its
    declared dependencies are not needed by the writer and would pin others)."""
    if not has_module("mediapipe"):
        raise ConversionError("mediapipe is not installed (TFLite metadata writer): pip install --no-deps "
                              "mediapipe==0.10.21")
    with redirect_stderr(io.StringIO()):  # MediaPipe's import prints TensorFlow / protobuf chatter
        return tuple(importlib.import_module(f"{_WRITERS}.{m}")  # type: ignore[return-value]
                     for m in ("metadata_writer", "metadata_info", "writer_utils"))


def write_metadata(model: bytes, card: ModelCard) -> tuple[bytes, str]:
    """``model`` with TFLite Metadata populated from ``card``; returns (model bytes, metadata JSON)."""
    writers, info, utils = _writer_modules()
    buf = bytearray(model)
    graph = utils.get_subgraph(buf)
    in_shapes = [list(graph.Tensors(graph.Inputs(i)).ShapeAsNumpy()) for i in range(graph.InputsLength())]
    out_shapes = [list(graph.Tensors(graph.Outputs(i)).ShapeAsNumpy()) for i in range(graph.OutputsLength())]
    writer = writers.MetadataWriter.create(buf)
    writer._general_md = info.GeneralMd(  # add_general_info() takes name and description only
        name=card.name, version=card.version, description=card.summary, author=card.author_or_default,
        licenses=card.license_or_default)
    pre = card.preprocessing
    for i, shape in enumerate(in_shapes):
        if i == 0 and _is_image_input(pre, shape, len(in_shapes)):
            mean, std = normalization_for(pre)
            color = {"RGB": writer.color_space_types.RGB, "GRAY": writer.color_space_types.GRAYSCALE}.get(
                pre.color, writer.color_space_types.UNKNOWN)
            writer.add_image_input(mean, std, color_space_type=color, name="image",
                                   description=_preprocessing_text(pre)
                                   + (" (channel order BGR)" if pre.color == "BGR" else ""))
        else:
            text = f"input tensor {i}, shape {shape}" + (f"; made by {_preprocessing_text(pre)}" if pre else "")
            writer.add_feature_input(name=f"input_{i}", description=text)
    classify = card.is_classifier and len(out_shapes) == 1 and out_shapes[0][-1] == len(card.labels or ())
    for i, shape in enumerate(out_shapes):
        if classify:
            writer.add_classification_output(writers.Labels().add(list(card.labels or ())), name="scores",
                                             description=f"score of each of the {len(card.labels or ())} classes "
                                             "(labels.txt, in output order)")
        else:
            writer.add_feature_output(name=f"output_{i}", description=f"output tensor {i}, shape {shape}")
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        out, meta_json = writer.populate()
    return bytes(out), meta_json


def _outputs(path: Path) -> list[np.ndarray] | None:
    """LiteRT's raw outputs on an all-zero input (None when LiteRT is not installed)."""
    if not has_module("ai_edge_litert"):
        return None
    from edge_sdk.runtimes.litert import RUNTIME

    session = RUNTIME.load(path)
    try:
        return session.run([np.zeros(s.shape, np.dtype(s.dtype)) for s in session.inputs], raw=True)
    finally:
        session.close()


def annotate_tflite(bundle_dir: Path, art: Artifact, card: ModelCard | None, result: Any = None) -> None:
    """Write TFLite Metadata into the bundle's copy of a ``.tflite`` artifact, then recompute its sha256 / size.

    No-op for other formats, without a card, and for a ``.tflite`` bundled as it is (route ``as-is``).
    ``result`` (the ArtifactResult) gets the new size too.
    """
    if card is None or art.format != Format.TFLITE.value:
        return
    if getattr(result, "route", None) == "as-is":  # a user's own .tflite ships byte for byte (its own metadata, if any)
        return
    path = Path(bundle_dir) / art.path
    old = path.stat().st_size
    try:
        before = _outputs(path)
        with tempfile.TemporaryDirectory() as tmp:
            annotated = Path(tmp) / path.name
            annotated.write_bytes(write_metadata(path.read_bytes(), card)[0])
            after = _outputs(annotated)
            if before is not None and (after is None or len(before) != len(after)
                                       or not all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))):
                raise ConversionError("the model's outputs changed when metadata was added")
            shutil.copyfile(annotated, path)
    except Exception as exc:  # metadata is an extra for tool-chains: the validated artifact ships either way
        art.notes.append(f"TFLite metadata not written ({first_line(exc)}); the manifest describes the model")
        return
    art.sha256 = sha256_path(path)  # after the rewrite: the manifest describes the file that ships
    art.size_bytes = int(art.size_bytes) + path.stat().st_size - old
    art.notes.append("TFLite Metadata written with MediaPipe's metadata writer (labels, normalization, tensor "
                     "descriptions); outputs checked identical before/after")
    if result is not None:
        result.size_bytes = art.size_bytes
