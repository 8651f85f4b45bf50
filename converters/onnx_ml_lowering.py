"""Lower ONNX-ML (``ai.onnx.ml``: scikit-learn via skl2onnx) operators to standard ONNX ops, ORT's numerics kept.

onnx2tf, onnx2torch and OpenVINO's ONNX frontend have none of the ``ai.onnx.ml`` operators, so a scikit-learn
model exported with skl2onnx reaches no target but ONNX. This graph rewrite replaces them by standard ops:

* ``LinearClassifier`` -> MatMul + Add; label = ArgMax (first maximum, as ORT) of the raw scores, then Gather on the
  class labels; scores through ``post_transform`` (NONE, LOGISTIC = Sigmoid, SOFTMAX, SOFTMAX_ZERO; PROBIT is
  refused: ORT's float32 ErfInv approximation cancels near 0.5, measured 2e-4 apart from any graph). One
  coefficient row (binary, exactly two labels as ORT demands): label =
  labels[1] when the raw score ``s`` > 0 else labels[0]; scores ``[sigmoid(-s), sigmoid(s)]`` for LOGISTIC and
  ``[1 - s, s]`` of the RAW score for NONE / SOFTMAX / SOFTMAX_ZERO (measured on ONNX Runtime 1.32; older ORT
  sources apply no transform there); PROBIT is refused (ORT's binary PROBIT output has a broken layout).
  skl2onnx itself writes binary logistic regression as two rows (``-w``, ``w``), LOGISTIC, then Normalizer L1.
* ``LinearRegressor`` -> MatMul (+ Add when ``intercepts`` has one value per target, as ORT), ``post_transform``
  as above (for one target the transform changes nothing, as ORT).
* ``Scaler`` -> ``(X - offset) * scale``; ``Normalizer`` MAX (row maximum, not absolute), L1, L2, a zero norm
  leaves the row unchanged (as ORT); ``Binarizer``; ``ArrayFeatureExtractor`` -> Gather on the last axis.
* ``ZipMap`` -> Identity: its ``seq(map)`` output becomes a float tensor ``[N, C]`` whose column ``k`` is class label
  ``k`` of its ``classlabels_*`` attribute; :func:`zipmap_to_array` turns ONNX Runtime's list of dicts from the
  original file into that same array, so validation compares the probabilities, not only the label.
* String class labels (``classlabels_strings``): a string tensor has no TFLite / OpenVINO equivalent, so the label
  output becomes the int64 INDEX into the class-label list (the list is kept in :attr:`Lowering.label_maps` and
  :func:`labels_to_index` maps the original model's strings the same way). Refused when the label feeds other ops.
* Other ``ai.onnx.ml`` operators (trees, SVM, encoders, imputers ...) -> :class:`OnnxMlError` naming them.

Inputs that are not float are cast to float first (ORT does the same). Models that import no default-domain opset
(skl2onnx's oldest files, e.g. ORT's ``logreg_iris.onnx``) get opset 13; reductions are emitted in the form the
model's opset expects. Design (converters/source_onnx.py): ALL targets, the ONNX artifact included, get the lowered
graph, so every artifact has the same tensor outputs; the reference is ONNX Runtime on the ORIGINAL file with its
ZipMap / string outputs converted as above, which checks the lowering itself on the validation inputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.errors import UnsupportedConversionError

__all__ = ["LOWERABLE", "ML_DOMAIN", "Lowering", "OnnxMlError", "check_lowered", "labels_to_index", "lower_onnx_ml",
           "ml_op_types", "zipmap_to_array"]

ML_DOMAIN = "ai.onnx.ml"
_DEFAULT_OPSET = 13
_TRANSFORMS = ("NONE", "LOGISTIC", "SOFTMAX", "SOFTMAX_ZERO", "PROBIT")


class OnnxMlError(UnsupportedConversionError):
    """An ``ai.onnx.ml`` graph this module cannot lower (the message names the operator and why)."""


@dataclass
class Lowering:
    """The lowered model and what changed: ``replaced`` op types, ``zipmap_outputs`` (graph output -> class labels in
    column order) and ``label_maps`` (graph output that held string labels -> the labels its int64 index refers to)."""

    model: Any
    replaced: list[str] = field(default_factory=list)
    zipmap_outputs: dict[str, list[Any]] = field(default_factory=dict)
    label_maps: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def ml_op_types(model: Any) -> list[str]:
    """Sorted ``ai.onnx.ml`` operator types used in the model's main graph."""
    return sorted({n.op_type for n in model.graph.node if n.domain == ML_DOMAIN})


def check_lowered(source: Any) -> None:
    """Raise the source's ONNX-ML refusal (converters/source_onnx.py ``ml_refusal``) for targets without ONNX-ML."""
    reason = getattr(source, "ml_refusal", None)
    if reason:
        raise OnnxMlError(reason)


def _attrs(onnx: Any, node: Any) -> dict[str, Any]:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = [s.decode() for s in v] if a.type == onnx.AttributeProto.STRINGS else (
            v.decode() if isinstance(v, bytes) else v)
    return out


class _Builder:
    """Emits standard nodes and constant initializers with unique names."""

    def __init__(self, onnx: Any, graph: Any, opset: int) -> None:
        self.onnx, self.opset, self.nodes, self.inits = onnx, opset, [], []
        self.widths: dict[str, int] = {}  # tensor -> known size of its axis 1
        self.notes: list[str] = []
        self._used = {n for node in graph.node for n in (*node.input, *node.output, node.name)}
        self._used |= {i.name for i in graph.initializer} | {i.name for i in graph.input}

    def name(self, hint: str) -> str:
        k, cand = 0, hint
        while cand in self._used:
            k += 1
            cand = f"{hint}_{k}"
        self._used.add(cand)
        return cand

    def const(self, hint: str, value: Any, dtype: Any = np.float32) -> str:
        name = self.name(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], hint: str, out: str | None = None, **attrs: Any) -> str:
        out = out or self.name(f"{hint}_{op_type.lower()}")
        self.nodes.append(self.onnx.helper.make_node(op_type, list(inputs), [out], name=self.name(f"{hint}/{op_type}"),
                                                     **attrs))
        return out

    def reduce(self, op: str, x: str, hint: str) -> str:
        """Row reduction [N, 1] (``axes`` became an input: ReduceSum at opset 13, the other Reduce* at 18)."""
        if self.opset >= (13 if op == "ReduceSum" else 18):
            return self.op(op, [x, self.const(f"{hint}_axes", [1], np.int64)], hint, keepdims=1)
        return self.op(op, [x], hint, axes=[1], keepdims=1)

    def safe_div(self, x: str, denom: str, hint: str) -> str:
        """x / denom, leaving rows with denom == 0 unchanged (ORT's Normalizer)."""
        zero = self.op("Equal", [denom, self.const(f"{hint}_zero", 0.0)], hint)
        d = self.op("Where", [zero, self.const(f"{hint}_one", 1.0), denom], hint)
        return self.op("Div", [x, d], hint)


def _as_float(b: _Builder, x: str, elem: int, hint: str) -> str:
    return x if elem in (0, b.onnx.TensorProto.FLOAT) else b.op("Cast", [x], hint, to=b.onnx.TensorProto.FLOAT)


def _transform(b: _Builder, raw: str, width: int, how: str, hint: str, out: str | None = None) -> str:
    """ORT's batched_update_scores_inplace for width > 1, or width == 1 without a second class."""
    if how == "PROBIT":
        raise OnnxMlError(f"{hint}: post_transform PROBIT is not lowered (ONNX Runtime's float32 ErfInv approximation "
                          "cancels near 0.5 and no graph reproduces it to 1e-5): use the onnx target")
    if how not in _TRANSFORMS:
        raise OnnxMlError(f"{hint}: post_transform {how!r} is not one of {', '.join(_TRANSFORMS)}: re-export the model")
    if width == 1 or how == "NONE":
        res = raw
    elif how == "LOGISTIC":
        res = b.op("Sigmoid", [raw], hint)
    elif how == "SOFTMAX":
        res = b.op("Softmax", [raw], hint, axis=1)
    else:  # SOFTMAX_ZERO: entries within 1e-7 of 0 stay ~0 (x * exp(-max)) and are left out of the sum
        mx = b.reduce("ReduceMax", raw, hint)
        keep = b.op("Greater", [b.op("Abs", [raw], hint), b.const(f"{hint}_eps", 1e-7)], hint)
        e = b.op("Where", [keep, b.op("Exp", [b.op("Sub", [raw, mx], hint)], hint),
                           b.op("Mul", [raw, b.op("Exp", [b.op("Neg", [mx], hint)], hint)], hint)], hint)
        total = b.reduce("ReduceSum", b.op("Where", [keep, e, b.const(f"{hint}_0", 0.0)], hint), hint)
        res = b.op("Div", [e, total], hint)
    return b.op("Identity", [res], hint, out=out) if out else res


def _linear(b: _Builder, x: str, coef: Sequence[float], intercepts: Sequence[float] | None, rows: int,
            hint: str, width: int = 0) -> str:
    """x @ W.T (+ intercepts), W = [rows, width] read row-major from ``coef`` as ORT's Gemm reads it: when the input
    has fewer features than the coefficients imply, ORT uses the first rows * width values (noted)."""
    w = np.asarray(coef, np.float32)
    width = width or (w.size // rows if rows else 0)
    if rows < 1 or width < 1 or w.size < rows * width:
        raise OnnxMlError(f"{hint}: {w.size} coefficients do not fit {rows} rows x {width} features: re-export the "
                          "model")
    if w.size != rows * width:
        b.notes.append(f"{hint}: {w.size} coefficients for {rows} rows but the input has {width} features; ONNX "
                       f"Runtime uses the first {rows * width} (the lowering does the same)")
    y = b.op("MatMul", [x, b.const(f"{hint}_coefficients", w[:rows * width].reshape(rows, width).T)], hint)
    return b.op("Add", [y, b.const(f"{hint}_intercepts", intercepts)], hint) if intercepts is not None else y


def _linear_classifier(b: _Builder, node: Any, a: dict[str, Any], x: str, label_is_output: bool) -> list[str]:
    hint = node.name or node.output[0]
    intercepts = list(a.get("intercepts", []))
    rows = len(intercepts)  # ORT: the class count is the number of intercepts
    strings = list(a.get("classlabels_strings", []))
    labels: list[Any] = strings or list(a.get("classlabels_ints", []))
    if strings and not label_is_output:
        raise OnnxMlError(f"{hint}: LinearClassifier string labels feed other operators; only a label that is a graph "
                          "output can become a class index: re-export with integer class labels")
    how = a.get("post_transform", "NONE")
    raw = _linear(b, x, a["coefficients"], intercepts, rows, hint, b.widths.get(node.input[0], 0))
    label_out = node.output[0]
    scores_out = node.output[1] if len(node.output) > 1 and node.output[1] else None
    if rows == 1:  # binary, as ONNX Runtime 1.32 (measured): it refuses a label count other than 2
        if len(labels) != 2:
            raise OnnxMlError(f"{hint}: binary LinearClassifier (one coefficient row) needs exactly 2 class labels, "
                              f"it has {len(labels)} (ONNX Runtime refuses it too): re-export the model")
        if scores_out and how == "PROBIT":
            raise OnnxMlError(f"{hint}: binary LinearClassifier with PROBIT (ONNX Runtime's output layout is broken "
                              "there) is not lowered: use the onnx target")
        pos = b.op("Cast", [b.op("Greater", [b.op("Reshape", [raw, b.const(f"{hint}_flat", [-1], np.int64)], hint),
                                             b.const(f"{hint}_zero", 0.0)], hint)], hint, to=b.onnx.TensorProto.INT64)
        table = [0, 1] if strings else labels
        b.op("Gather", [b.const(f"{hint}_labels", table, np.int64), pos], hint, out=label_out, axis=0)
        if scores_out and how == "LOGISTIC":  # [sigmoid(-s), sigmoid(s)]
            neg = b.op("Sigmoid", [b.op("Neg", [raw], hint)], hint)
            b.op("Concat", [neg, b.op("Sigmoid", [raw], hint)], hint, out=scores_out, axis=1)
        elif scores_out:  # NONE / SOFTMAX / SOFTMAX_ZERO: [1 - s, s] of the raw score
            neg = b.op("Sub", [b.const(f"{hint}_one", [[1.0]]), raw], hint)
            b.op("Concat", [neg, raw], hint, out=scores_out, axis=1)
    else:
        if len(labels) < rows:
            raise OnnxMlError(f"{hint}: LinearClassifier has {rows} classes but {len(labels)} class labels: "
                              "re-export the model")
        table = list(range(rows)) if strings else labels[:rows]
        best = b.op("ArgMax", [raw], hint, axis=1, keepdims=0)
        b.op("Gather", [b.const(f"{hint}_labels", table, np.int64), best], hint, out=label_out, axis=0)
        if scores_out:
            _transform(b, raw, rows, how, hint, out=scores_out)
    return strings


def _lower_node(b: _Builder, node: Any, a: dict[str, Any], elem: int, graph_outputs: set[str],
                lowering: Lowering, consumers: dict[str, int]) -> None:
    hint = node.name or node.output[0]
    op, out = node.op_type, node.output[0]
    x = node.input[0]
    if op == "ZipMap":
        b.op("Identity", [x], hint, out=out)
        keys = a.get("classlabels_int64s") or a.get("classlabels_strings") or []
        if out in graph_outputs:
            lowering.zipmap_outputs[out] = list(keys)
        return
    xf = _as_float(b, x, elem, hint) if op != "ArrayFeatureExtractor" else x
    if op == "LinearClassifier":
        label_is_output = node.output[0] in graph_outputs and consumers.get(node.output[0], 0) == 0
        strings = _linear_classifier(b, node, a, xf, label_is_output)
        if strings:
            lowering.label_maps[node.output[0]] = strings
    elif op == "LinearRegressor":
        targets = int(a.get("targets", 1))
        ic = list(a.get("intercepts", []))
        raw = _linear(b, xf, a["coefficients"], ic if len(ic) == targets else None, targets, hint,
                      b.widths.get(x, 0))
        _transform(b, raw, targets, a.get("post_transform", "NONE"), hint, out=out)
    elif op == "Scaler":
        y = b.op("Sub", [xf, b.const(f"{hint}_offset", a.get("offset", [0.0]))], hint)
        b.op("Mul", [y, b.const(f"{hint}_scale", a.get("scale", [1.0]))], hint, out=out)
    elif op == "Normalizer":
        norm = a.get("norm", "MAX")
        if norm == "MAX":
            d = b.reduce("ReduceMax", xf, hint)
        elif norm in ("L1", "L2"):
            d = b.reduce("ReduceSum", b.op("Abs", [xf], hint) if norm == "L1" else b.op("Mul", [xf, xf], hint), hint)
            d = b.op("Sqrt", [d], hint) if norm == "L2" else d
        else:
            raise OnnxMlError(f"{hint}: Normalizer norm {norm!r} is not MAX, L1 or L2: re-export the model")
        b.op("Identity", [b.safe_div(xf, d, hint)], hint, out=out)
    elif op == "Binarizer":
        above = b.op("Greater", [xf, b.const(f"{hint}_threshold", a.get("threshold", 0.0))], hint)
        b.op("Cast", [above], hint, out=out, to=b.onnx.TensorProto.FLOAT)
    elif op == "ArrayFeatureExtractor":
        idx = b.op("Reshape", [node.input[1], b.const(f"{hint}_flat", [-1], np.int64)], hint)
        b.op("Gather", [x, idx], hint, out=out, axis=-1)
    else:  # pragma: no cover - filtered by the caller
        raise OnnxMlError(f"no lowering for ai.onnx.ml.{op}")


LOWERABLE = ("LinearClassifier", "LinearRegressor", "Scaler", "Normalizer", "Binarizer", "ArrayFeatureExtractor",
             "ZipMap")


def lower_onnx_ml(model: Any) -> Lowering | None:
    """Replace every ``ai.onnx.ml`` node of ``model`` (a ModelProto, not modified) by standard ops; None when there
    is none. Raises :class:`OnnxMlError` naming the operators it cannot lower."""
    onnx = require("onnx", "onnx", "lowering ONNX-ML operators")
    found = ml_op_types(model)
    if not found:
        return None
    unknown = [op for op in found if op not in LOWERABLE]
    if unknown:
        raise OnnxMlError(f"ONNX-ML operator(s) {', '.join(unknown)} have no standard-ONNX lowering (supported: "
                          f"{', '.join(LOWERABLE)}): use the onnx target, which runs them in ONNX Runtime")
    if any(n.op_type in ("If", "Loop", "Scan") for n in model.graph.node):
        raise OnnxMlError("ONNX-ML operators next to If/Loop/Scan subgraphs are not lowered: use the onnx target")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a hint: types then default to float, widths to unknown
        inferred = model
    types: dict[str, Any] = {v.name: v.type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                       *inferred.graph.output)}
    default = [o for o in m.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        m.opset_import.append(onnx.helper.make_opsetid("", _DEFAULT_OPSET))
        m.ir_version = max(m.ir_version, 7)
    opset = default[0].version if default else _DEFAULT_OPSET
    if opset < 9:
        raise OnnxMlError(f"the model imports ONNX opset {opset}; lowering ONNX-ML needs 9 or newer: re-export it")
    b = _Builder(onnx, m.graph, opset)
    for name, t in types.items():
        dims = t.tensor_type.shape.dim if t.HasField("tensor_type") else []
        if len(dims) == 2 and dims[1].HasField("dim_value"):
            b.widths[name] = int(dims[1].dim_value)
    outputs = {o.name for o in m.graph.output}
    consumers: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            if n.op_type != "Identity":
                consumers[i] = consumers.get(i, 0) + 1
    lowering = Lowering(m)
    new_nodes = []
    for node in m.graph.node:
        if node.domain != ML_DOMAIN:
            new_nodes.append(node)
            continue
        t = types.get(node.input[0])
        elem = t.tensor_type.elem_type if t is not None and t.HasField("tensor_type") else 0
        if elem == onnx.TensorProto.STRING and node.op_type != "ArrayFeatureExtractor":
            raise OnnxMlError(f"{node.name or node.op_type}: ai.onnx.ml.{node.op_type} on a string tensor cannot be "
                              "lowered: use the onnx target")
        start = len(b.nodes)
        _lower_node(b, node, _attrs(onnx, node), elem, outputs, lowering, consumers)
        new_nodes.extend(b.nodes[start:])
        lowering.replaced.append(node.op_type)
    del m.graph.node[:]
    m.graph.node.extend(new_nodes)
    m.graph.initializer.extend(b.inits)
    lowering.notes = b.notes
    _retype_outputs(onnx, m, types, lowering)
    del m.graph.value_info[:]  # stale hints (string labels, seq(map)); inference redoes them
    if not ml_op_types(m):
        keep = [o for o in m.opset_import if o.domain != ML_DOMAIN]
        del m.opset_import[:]
        m.opset_import.extend(keep)
    onnx.checker.check_model(m)
    return lowering


def _retype_outputs(onnx: Any, m: Any, types: dict[str, Any], lowering: Lowering) -> None:
    """ZipMap outputs become float [N, C] tensors, string-label outputs int64 [N]."""
    zip_inputs = {n.output[0]: n.input[0] for n in m.graph.node if n.output and n.output[0] in lowering.zipmap_outputs}
    for o in m.graph.output:
        if o.name in lowering.zipmap_outputs:
            src = types.get(zip_inputs.get(o.name, ""))
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in src.tensor_type.shape.dim] if src is not None and src.HasField("tensor_type") else \
                [None, len(lowering.zipmap_outputs[o.name]) or None]
            o.type.CopyFrom(onnx.helper.make_tensor_type_proto(onnx.TensorProto.FLOAT, dims))
        elif o.name in lowering.label_maps:
            o.type.tensor_type.elem_type = onnx.TensorProto.INT64


def zipmap_to_array(value: Any, keys: Sequence[Any]) -> np.ndarray:
    """ONNX Runtime's ZipMap output (a list of ``{label: prob}``) as a float32 ``[N, C]`` array, columns in ``keys``
    order (the lowered graph's column order); a tensor is returned as float32 unchanged."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float32)
    rows = list(value)
    order = list(keys) or (list(rows[0]) if rows else [])
    return np.asarray([[float(r[k]) for k in order] for r in rows], np.float32).reshape(len(rows), len(order))


def labels_to_index(value: Any, labels: Iterable[str]) -> np.ndarray:
    """String class labels as int64 indices into ``labels`` (the lowered graph's label output)."""
    table = {s: k for k, s in enumerate(labels)}
    return np.asarray([table[str(v)] for v in np.asarray(value).ravel()], np.int64).reshape(np.shape(value))
