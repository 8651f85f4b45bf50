"""Error-compensating int8 weight rounding (GPTQ / Optimal Brain Quantization) for Conv, Gemm and MatMul weights.

Rounding every weight to its nearest int8 level throws away what the calibration data says about the layer: the
error of one rounded weight can be cancelled by nudging the weights that share its inputs. GPTQ (Frantar et al.,
2022) does this layer by layer in closed form from ``H = sum x x^T`` of the layer's calibration inputs: each column
is rounded in turn and its error is spread over the columns not yet rounded, weighted by ``H^-1``. No gradient
steps, no extra dependency: NumPy only, about 40 s for MobileNetV2 on 32 samples, 1 thread.

The result is still a float model: every weight lies exactly on its int8 grid (per output channel, symmetric,
scale = max|w| / 127 — the grid ONNX Runtime's quantizer and NNCF recompute from the weights), so the quantizer
that runs next picks the same integers; the channel's largest weight keeps its level so the scale does not move.

Measured on ImageNet MobileNetV2, 240 real photo crops, top-1 agreement with fp32 when only the weights are
int8 (activations float): nearest rounding 87.1%, GPTQ 98.3% (cosine 0.9953 -> 0.9996).

With 8-bit activations the gain vanishes on MobileNetV2 (ORT 87.1% -> 86.3%; NNCF on OpenVINO with GPTQ weights
89.6% -> 83.3%): the activations' rounding is then the limit. With 16-bit activations (ORT) 87.1% -> 95.8%, which is
where the accuracy budget uses it (the ``int16-activations`` rung). :func:`gptq_onnx` turns an fp32 ``.onnx`` file
into a new one; frameworks are imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from edge_sdk._deps import require
from edge_sdk.calibration import SampleSet
from edge_sdk.converters.onnx_probe import node_attr
from edge_sdk.errors import ConversionError

__all__ = ["QMAX", "conv_patches", "gptq_onnx", "gptq_round", "symmetric_int8"]

QMAX = 127  # symmetric narrow-range int8 weights: levels -127..127
_MAX_PATCH_FLOATS = 64_000_000  # im2col of one sample of one layer above this (256 MB): that layer keeps nearest
#: H (groups x cols x cols, float64) above this (128 MB) keeps nearest too: CREPE full's second conv reads 1024
#: channels x 64 taps, a 65536 x 65536 H of 32 GB, and GPTQ's inverse needs more again
_MAX_HESSIAN_FLOATS = 4096 * 4096
#: such a layer gets GPTQ over blocks of its inputs instead (H's diagonal blocks, correlations across blocks
#: ignored) while groups x cols x block stays under this (512 MB): CREPE full's conv, 64 blocks of 1024 inputs
_MAX_BLOCKED_FLOATS = 64 * 1024 * 1024
_MIN_BLOCK = 256


def symmetric_int8(w: np.ndarray, axes: int | tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Nearest symmetric int8 of ``w`` (levels -``QMAX``..``QMAX``), one scale per slice over ``axes``: (int8
    values, float32 scales = max|w| / ``QMAX`` with ``axes`` kept as size 1; an all-zero slice gets scale 1)."""
    amax = np.abs(w).max(axis=axes, keepdims=True)
    scale = np.where(amax > 0, amax / QMAX, 1.0).astype(np.float32)
    return np.clip(np.rint(w / scale), -QMAX, QMAX).astype(np.int8), scale


def conv_patches(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], pads: tuple[int, int, int, int],
                 group: int) -> np.ndarray:
    """im2col of one sample ``x`` (C, H, W) of a 2-D convolution: (group, positions, C/group * kh * kw), in the
    (channel, kh, kw) order of a flattened ONNX/OpenVINO weight row. ``pads`` is (top, left, bottom, right)."""
    kh, kw = kernel
    c = x.shape[0]
    if (kh, kw) == (1, 1) and tuple(strides) == (1, 1) and not any(pads):
        return x.reshape(group, c // group, -1).transpose(0, 2, 1)
    xp = np.pad(x, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    v = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::strides[0], ::strides[1]]
    ho, wo = v.shape[1:3]
    return v.reshape(group, c // group, ho * wo, kh * kw).transpose(0, 2, 1, 3).reshape(group, ho * wo, -1)


def gptq_round(w: np.ndarray, h: np.ndarray, damp: float = 0.01, qmax: int = QMAX, *,
               scale: np.ndarray | None = None, pin: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding of ``w`` (groups, rows, cols) given ``h`` (groups, cols, cols) = sum of x x^T of the inputs.

    Returns (integer levels, scale per row) with ``levels * scale[..., None]`` the rounded weights; each row's
    largest |w| keeps level +-``qmax`` so the scale recomputed from the rounded weights is the same (``qmax`` 64:
    the 7-bit grid of ORT's ``reduce_range``). For one block of a row's inputs, ``scale`` (groups, rows) is the
    whole row's and ``pin`` (groups, rows) the column of this block holding the row's largest weight (-1: none).
    """
    w = w.astype(np.float64)
    if scale is None:
        scale = np.abs(w).max(axis=2) / qmax
        scale[scale == 0] = 1.0
    hmat = h.astype(np.float64).copy()
    groups, _rows, cols = w.shape
    diag = np.einsum("gii->gi", hmat)
    dead = diag <= 0  # inputs that are always zero: their weights never matter
    for g in range(groups):
        hmat[g][dead[g], dead[g]] = 1.0
    hmat += (damp * np.maximum(diag.mean(axis=1), 1e-12))[:, None, None] * np.eye(cols)[None]
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(hmat)).transpose(0, 2, 1)  # upper factor of H^-1
    except np.linalg.LinAlgError:
        return np.clip(np.round(w / scale[..., None]), -qmax, qmax), scale  # nearest rounding for this layer
    amax = np.abs(w).argmax(axis=2) if pin is None else pin
    sign = np.sign(np.take_along_axis(w, np.maximum(amax, 0)[..., None], axis=2)[..., 0])
    work = np.where(dead[:, None, :], 0.0, w)
    q = np.zeros_like(w)
    for i in range(cols):
        col = work[:, :, i]
        qi = np.clip(np.round(col / scale), -qmax, qmax)
        qi = np.where(amax == i, sign * qmax, qi)  # the channel's largest weight pins the scale
        q[:, :, i] = qi
        err = (col - qi * scale) / hinv[:, i, i][:, None]
        work[:, :, i + 1:] -= err[:, :, None] * hinv[:, i, i + 1:][:, None, :]
    return q, scale


class _Layer:
    """One weighted layer: how to turn its input into (groups, positions, cols) and its weight into
    (groups, rows, cols) and back."""

    def __init__(self, name: str, weight: np.ndarray, kind: str, group: int = 1, strides: tuple[int, int] = (1, 1),
                 pads: tuple[int, int, int, int] = (0, 0, 0, 0), transposed: bool = False) -> None:
        self.name, self.weight, self.kind, self.group = name, weight, kind, group
        self.strides, self.pads, self.transposed = strides, pads, transposed
        self.h: np.ndarray | None = None
        self.diag: np.ndarray | None = None  # H's diagonal (groups, cols): kept for layers too large for H
        self.hb: list[np.ndarray] | None = None  # H's diagonal blocks (groups, b, b), for layers too large for H
        rows = self.rows()
        groups, cols = rows.shape[0], rows.shape[2]
        self.full = groups * cols**2 <= _MAX_HESSIAN_FLOATS
        self.block = 0  # inputs per block of the blocked GPTQ (0: none)
        if not self.full:
            b = 4096
            while b >= _MIN_BLOCK and groups * cols * b > _MAX_BLOCKED_FLOATS:
                b //= 2
            self.block = b if b >= _MIN_BLOCK else 0

    def blocks(self) -> list[slice]:
        cols = self.rows().shape[2]
        return [slice(i, min(i + self.block, cols)) for i in range(0, cols, self.block)] if self.block else []

    def rows(self) -> np.ndarray:
        if self.kind == "matmul":  # (out, in) rows
            return (self.weight if self.transposed else self.weight.T)[None]
        w = self.weight
        return w.reshape(self.group, w.shape[0] // self.group, -1)

    def back(self, rows: np.ndarray) -> np.ndarray:
        if self.kind == "matmul":
            return (rows[0] if self.transposed else rows[0].T).astype(np.float32)
        return rows.reshape(self.weight.shape).astype(np.float32)

    def add(self, x: np.ndarray) -> bool:
        """Accumulate one sample's input; False when the layer is too large to analyse (it keeps nearest). A layer
        too large for H (``full`` False) accumulates only H's diagonal: no GPTQ, but an estimate of its error."""
        if self.kind == "matmul":
            p = x.reshape(1, -1, x.shape[-1])
        else:
            if x.ndim != 4 or x.shape[0] != 1:
                return False
            kh, kw = self.weight.shape[2:]
            positions = ((x.shape[2] + self.pads[0] + self.pads[2] - kh) // self.strides[0] + 1) * (
                (x.shape[3] + self.pads[1] + self.pads[3] - kw) // self.strides[1] + 1)
            if positions * x.shape[1] * kh * kw > _MAX_PATCH_FLOATS:
                return False
            p = conv_patches(x[0], (kh, kw), self.strides, self.pads, self.group)
        p = p.astype(np.float64)
        diag = np.einsum("gpi,gpi->gi", p, p, optimize=True)
        self.diag = diag if self.diag is None else self.diag + diag
        if self.full:
            h = np.einsum("gpi,gpj->gij", p, p, optimize=True)
            self.h = h if self.h is None else self.h + h
        elif self.block:
            parts = [np.matmul(p[:, :, sl].transpose(0, 2, 1), p[:, :, sl]) for sl in self.blocks()]
            self.hb = parts if self.hb is None else [a + b for a, b in zip(self.hb, parts, strict=True)]
        return True

    def rounded(self, damp: float, qmax: int = QMAX) -> np.ndarray:
        if self.h is not None:
            q, scale = gptq_round(self.rows(), self.h, damp, qmax)
            return self.back(q * scale[..., None])
        if self.hb is None:
            return self.weight
        w = self.rows().astype(np.float64)  # GPTQ per block of inputs, on the whole row's grid
        scale = np.abs(w).max(axis=2) / qmax
        scale[scale == 0] = 1.0
        amax = np.abs(w).argmax(axis=2)
        q = np.empty_like(w)
        for sl, hb in zip(self.blocks(), self.hb, strict=True):
            pin = np.where((amax >= sl.start) & (amax < sl.stop), amax - sl.start, -1)
            q[:, :, sl] = gptq_round(w[:, :, sl], hb, damp, qmax, scale=scale, pin=pin)[0]
        return self.back(q * scale[..., None])

    def nearest_error(self, qmax: int = QMAX) -> float:
        """Squared error of this layer's output on the calibration inputs with its weights rounded to the nearest
        int8 level (per row, symmetric), relative to its output: ``tr(dW H dW^T) / tr(W H W^T)``. Nearest, not GPTQ:
        with fewer samples than inputs GPTQ fits the samples' subspace and its error there says nothing. A layer too
        large for H uses its diagonal (correlations between inputs ignored: rounding errors taken as independent)."""
        if self.h is None and self.diag is None:
            return float("nan")
        w = self.rows().astype(np.float64)
        scale = np.abs(w).max(axis=2, keepdims=True) / qmax
        scale[scale == 0] = 1.0
        d = np.clip(np.round(w / scale), -qmax, qmax) * scale - w
        if self.h is not None:
            num = float(np.einsum("gri,gij,grj->", d, self.h, d, optimize=True))
            den = float(np.einsum("gri,gij,grj->", w, self.h, w, optimize=True))
        elif self.hb is not None:  # H's diagonal blocks: correlations within each block counted
            num = sum(float(np.einsum("gri,gij,grj->", d[:, :, sl], hb, d[:, :, sl], optimize=True))
                      for sl, hb in zip(self.blocks(), self.hb, strict=True))
            den = sum(float(np.einsum("gri,gij,grj->", w[:, :, sl], hb, w[:, :, sl], optimize=True))
                      for sl, hb in zip(self.blocks(), self.hb, strict=True))
        else:
            num = float(np.einsum("gri,gi->", d * d, self.diag, optimize=True))
            den = float(np.einsum("gri,gi->", w * w, self.diag, optimize=True))
        return num / den if den > 0 else float("nan")


def _accumulate(layers: dict[str, _Layer], inputs: dict[str, list[str]], run: Callable[[list[np.ndarray]], dict],
                samples: SampleSet, max_samples: int) -> list[str]:
    """Feed up to ``max_samples`` samples through ``run`` (sample -> {tensor: value}); returns skipped layers."""
    skipped: set[str] = set()
    for item in samples.take(max_samples):
        values = run(item)
        for tensor, names in inputs.items():
            for n in names:
                if n not in skipped and not layers[n].add(np.asarray(values[tensor])):
                    skipped.add(n)
                    layers[n].h = layers[n].diag = layers[n].hb = None
    return sorted(skipped | {n for n, layer in layers.items() if not layer.full and layer.hb is None})


def gptq_onnx(fp32_path: Path, out_path: Path, samples: SampleSet, input_names: list[str], *,
              max_samples: int = 32, damp: float = 0.01, qmax: int = QMAX,
              errors: dict[str, float] | None = None) -> dict[str, str]:
    """Write ``out_path``: ``fp32_path`` with every Conv/Gemm/MatMul weight rounded by GPTQ onto its int8 grid
    (levels -``qmax``..``qmax``; 64 for 7-bit ``reduce_range`` weights).

    Layers it cannot analyse (dilated, auto-padded or 3-D convolutions, non-constant weights, huge inputs) keep
    their weights. Returns what it did, for the manifest; ``errors`` (when given) receives each rounded layer's
    relative output error with nearest int8 rounding (:meth:`_Layer.nearest_error`) by node name.
    """
    onnx = require("onnx", "onnx", "GPTQ weight rounding")
    numpy_helper = require("onnx.numpy_helper", "onnx", "GPTQ weight rounding")
    ort = require("onnxruntime", "onnx", "GPTQ weight rounding")
    model = onnx.load(str(fp32_path))
    inits = {i.name: i for i in model.graph.initializer}
    layers: dict[str, _Layer] = {}
    inputs: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype != np.float32 or not node.name:
            continue
        if node.op_type == "Conv":
            pads = tuple(node_attr(node, "pads", [0, 0, 0, 0]))
            if (w.ndim != 4 or any(d != 1 for d in node_attr(node, "dilations", [1, 1])) or len(pads) != 4
                    or node_attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
                continue
            layer = _Layer(node.name, w, "conv", int(node_attr(node, "group", 1)),
                           tuple(node_attr(node, "strides", [1, 1])), (pads[0], pads[1], pads[2], pads[3]))
        elif node.op_type == "Gemm":
            if w.ndim != 2 or node_attr(node, "transA", 0):
                continue
            layer = _Layer(node.name, w, "matmul", transposed=bool(node_attr(node, "transB", 0)))
        else:
            if w.ndim != 2:
                continue
            layer = _Layer(node.name, w, "matmul")
        layers[node.name] = layer
        inputs.setdefault(node.input[0], []).append(node.name)
    if not layers:
        return {"onnx_weight_rounding": "nearest (no Conv/Gemm/MatMul weights to round)"}
    probe = onnx.load(str(fp32_path))
    have = {o.name for o in probe.graph.output}
    for t in inputs:
        if t not in have:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor kept by name
    so.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        raise ConversionError(f"GPTQ weight rounding could not run the fp32 model ({str(exc).splitlines()[0][:200]})"
                              ": set onnx_weight_rounding to 'nearest'") from None
    wanted = list(inputs)

    def run(item: list[np.ndarray]) -> dict[str, np.ndarray]:
        from edge_sdk.converters.onnx_quantize import _feed_array

        feed = {n: _feed_array(x) for n, x in zip(input_names, item, strict=True)}
        return dict(zip(wanted, sess.run(wanted, feed), strict=True))

    skipped = _accumulate(layers, inputs, run, samples, max_samples)
    for name, layer in layers.items():
        node_w = next(n.input[1] for n in model.graph.node if n.name == name)
        rounded = layer.rounded(damp, qmax)
        if errors is not None and (layer.h is not None or layer.diag is not None):
            errors[name] = layer.nearest_error(qmax)
        inits[node_w].CopyFrom(numpy_helper.from_array(rounded, node_w))
    onnx.save_model(model, str(out_path))
    done = len(layers) - len(skipped)
    return {"onnx_weight_rounding": f"gptq ({done} layers, {min(max_samples, len(samples))} samples, levels +-{qmax}"
                                    + (f"; nearest for {len(skipped)} too large" if skipped else "") + ")"}
