"""ONNX -> PyTorch (``onnx2torch``) -> TFLite (``litert-torch``): the second ONNX -> TFLite route.

onnx2tf (the first route) rewrites every tensor from NCHW to NHWC and stops on graphs where that rewriting does
not hold (attention adds, 1-D convolutions after an STFT, a constant-Q transform). This route never changes a
layout: the ONNX graph becomes an ``fx.GraphModule`` of PyTorch ops with onnx2torch 1.5.15, and the existing
PyTorch -> TFLite converter (converters/torch_to_tflite.py: litert-torch for fp32 / fp16 / dynamic, the AI Edge
Quantizer for int8) takes it from there. Inputs stay in the ONNX layout. Like every route, the artifact is
validated against the ONNX source on ONNX Runtime, so a wrong translation is refused, not shipped.

Three things make real graphs pass that onnx2torch alone leaves unexportable (measured on the corpus):

- the graph is constant-folded first by ONNX Runtime (basic level: standard ops only), so shape sub-graphs
  (``Shape -> Gather -> Concat -> Reshape``) become constants once the inputs are pinned;
- onnx2torch's Reshape / Slice / Pad / Expand / Squeeze / Unsqueeze / ReduceSum modules read their shape-like
  arguments from tensors (``.tolist()``), which ``torch.export`` cannot trace ("data-dependent expression");
  when those arguments are constants they are replaced by the same operation with Python values
  (:func:`bake_constant_args`); reflect / edge padding on any axes is done by moving the axes last;
- graph outputs made by a multi-output node get their own Identity (onnx2torch would return the node's whole
  tuple once for all of them);
- ``torchvision`` (which onnx2torch imports for NonMaxSuppression / RoiAlign only) is not installed: a stand-in
  is visible while onnx2torch is imported, and those two ops fail with a one-line reason.

``LSTM`` is added to onnx2torch's registry (converters/onnx_torch_ops.py); it has no converter for ``GRU`` nor
for ONNX-ML ops (``LinearClassifier``...): such graphs end in a one-line reason.
"""

from __future__ import annotations

import importlib
import re
import sys
import types
from pathlib import Path
from typing import Any

from edge_sdk._deps import has_module, require
from edge_sdk.converters.base import ArtifactDraft, ConversionContext, check_precision
from edge_sdk.converters.keras_to_tflite import TFLiteConverter, version_of
from edge_sdk.converters.onnx_ml_lowering import check_lowered
from edge_sdk.errors import ConversionError, MissingDependencyError, first_line
from edge_sdk.formats import Framework, Precision

__all__ = ["OnnxTorchToTFLite", "bake_constant_args", "linear_layers", "onnx_to_torch", "scalar_operands"]

_MAX_CONST = 64  # shape-like arguments longer than this are data, not shapes: left alone


def _import_onnx2torch() -> Any:
    """onnx2torch, imported with a stand-in ``torchvision`` when that is absent (only NMS / RoiAlign use it)."""
    if not has_module("onnx2torch"):
        raise MissingDependencyError("onnx2torch", "onnx2torch", "converting ONNX models to TFLite through PyTorch")
    if "onnx2torch" in sys.modules or has_module("torchvision"):
        return importlib.import_module("onnx2torch")

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise ConversionError("this ONNX graph uses NonMaxSuppression / RoiAlign, which onnx2torch runs with "
                              "torchvision (not installed): use the onnx2tf route or another target")

    tv, ops = types.ModuleType("torchvision"), types.ModuleType("torchvision.ops")
    tv.ops = ops  # type: ignore[attr-defined]
    ops.nms = ops.roi_align = ops.box_convert = unavailable  # type: ignore[attr-defined]
    sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
    try:
        return importlib.import_module("onnx2torch")
    finally:  # nothing else may see the stand-in
        sys.modules.pop("torchvision", None)
        sys.modules.pop("torchvision.ops", None)


#: ORT's MatMul + Add -> Gemm fusion: on PP-OCRv4 rec the fused Linear came out of litert-torch wrong (cosine 0.97
#: against 1.0000 unfused); constant folding is all this route needs
_NO_FUSION = ["MatMulAddFusion"]


def _fold_constants(model: Path, out: Path) -> Path:
    """``model`` constant-folded by ONNX Runtime (basic level: standard ONNX ops only), written to ``out``."""
    ort = require("onnxruntime", "onnxruntime", "constant-folding the ONNX graph")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(out)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"], disabled_optimizers=_NO_FUSION)
    except Exception as exc:  # ORT raises its own exception types
        raise ConversionError(f"ONNX Runtime could not constant-fold the model ({first_line(exc)})") from None
    return out


def _drop_trailing_empty_inputs(proto: Any) -> None:
    """``Clip(x, min, '')`` and the like: trailing empty optional inputs mean 'absent' (onnx2torch trips on them)."""
    for node in proto.graph.node:
        names = list(node.input)
        while names and names[-1] == "":
            names.pop()
        if len(names) != len(node.input):
            del node.input[:]
            node.input.extend(names)


def _isolate_graph_outputs(proto: Any, helper: Any) -> None:
    """A graph output made by a node with several outputs gets its own Identity: onnx2torch returns such a
    node's whole output tuple, once, for all of its graph outputs (an LSTM's Y_h and Y_c)."""
    outputs = {o.name for o in proto.graph.output}
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    for node in nodes:
        split = [name for name in node.output if name in outputs] if len(node.output) > 1 else []
        for k, name in enumerate(node.output):
            if name in split:
                node.output[k] = f"{name}__onnx2torch"
        proto.graph.node.append(node)  # a copy: edit before appending
        proto.graph.node.extend(helper.make_node("Identity", [f"{name}__onnx2torch"], [name],
                                                 name=f"{name}__onnx2torch_identity") for name in split)


def onnx_to_torch(model: Path, workdir: Path, info: dict[str, Any] | None = None) -> Any:
    """The ONNX file as a ``torch.fx.GraphModule`` ready for ``torch.export`` (constant-folded, shapes baked);
    what was rewritten on the way goes into ``info`` (``hard_swish_fused``, ``scalar_operands``)."""
    onnx = require("onnx", "onnx", "reading ONNX models")
    onnx2torch = _import_onnx2torch()
    from edge_sdk.converters.onnx_hard_swish import fuse_hard_swish
    from edge_sdk.converters.onnx_torch_ops import prepare_graph, register_extra_converters

    register_extra_converters()
    folded = _fold_constants(model, workdir / "folded.onnx")

    def load() -> Any:
        proto = onnx.load(str(folded))
        _drop_trailing_empty_inputs(proto)
        _isolate_graph_outputs(proto, onnx.helper)
        prepare_graph(proto)
        return proto

    proto = load()
    try:
        fused = fuse_hard_swish(proto, native=True)  # one aten.hardswish: litert-torch keeps it channels-last
    except Exception:  # an optional rewrite on a graph it does not understand: start again without it
        proto, fused = load(), 0
    if info is not None:
        info["hard_swish_fused"] = fused
    try:
        gm = onnx2torch.convert(proto)
    except NotImplementedError as exc:
        op = re.search(r"domain='([^']*)', operation_type='(\w+)', version=(\d+)", str(exc))
        what = (f"it has no converter for ONNX {(op[1] + '.') if op[1] else ''}{op[2]} (opset {op[3]})" if op
                else first_line(exc))
        raise ConversionError(f"onnx2torch cannot translate this graph: {what}; use another target or --route"
                              ) from None
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as exc:
        raise ConversionError(f"onnx2torch failed on this graph ({type(exc).__name__}: {first_line(exc)}): use "
                              "another target or --route") from None
    bake_constant_args(gm)
    linear_layers(gm)  # before scalar_operands: a linear layer's bias Add is folded into it
    try:
        scalar = scalar_operands(gm)
    except Exception:  # an optional rewrite (each replacement is whole before the next): the rest stays tensors
        gm.recompile()
        scalar = 0
    if info is not None:
        info["scalar_operands"] = scalar
    return gm.eval()


# --- constant shape-like arguments as Python values (torch.export cannot trace tensor.tolist()) ---------------

def _reshape(x: Any, shape: list[int]) -> Any:
    return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])


def _slice(x: Any, starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None) -> Any:
    import torch

    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = axis % x.dim()
        if step < 0:  # ONNX counts a reverse slice from the end: flip, then slice forward
            x = torch.flip(x, [axis])
            start, end, step = -start - 1, -end - 1, -step
        index = [slice(None)] * axis + [slice(start, end, step)]
        x = x[tuple(index)]
    return x


def _pad(x: Any, pads: list[int], value: float, mode: str) -> Any:
    import torch.nn.functional as F

    n = x.dim()
    begins, ends = pads[:n], pads[n:]
    if mode == "constant":
        flat: list[int] = []
        for b, e in zip(reversed(begins), reversed(ends), strict=True):
            flat += [b, e]
        return F.pad(x, flat, mode="constant", value=value)
    axes = [a for a in range(n) if begins[a] or ends[a]]
    if not axes:
        return x
    rest = [a for a in range(n) if a not in axes]
    perm = rest + axes  # padded axes last, where torch's reflect / replicate pad works
    y = x.permute(perm)
    lead = max(0, len(axes) + 1 - len(rest))  # torch needs at least one leading (batch) axis
    for _ in range(lead):
        y = y.unsqueeze(0)
    flat = []
    for a in reversed(axes):
        flat += [begins[a], ends[a]]
    y = F.pad(y, flat, mode=mode)
    for _ in range(lead):
        y = y.squeeze(0)
    inverse = [perm.index(a) for a in range(n)]
    return y.permute(inverse)


def _expand(x: Any, shape: list[int]) -> Any:
    import torch

    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))


def _squeeze(x: Any, axes: list[int] | None) -> Any:
    if not axes:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


def _unsqueeze(x: Any, axes: list[int]) -> Any:
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _reduce_sum(x: Any, axes: list[int] | None, keepdims: bool, noop_with_empty_axes: bool) -> Any:
    if not axes:
        return x if noop_with_empty_axes else x.sum().reshape([1] * x.dim() if keepdims else [])
    return x.sum(dim=tuple(axes), keepdim=keepdims)


_TORCH_PAD_MODE = {"reflect": "reflect", "edge": "replicate", "replicate": "replicate", "constant": "constant",
                   "circular": "circular", "wrap": "circular"}


def _replacement(module: Any, consts: list[Any]) -> tuple[Any, tuple[Any, ...]] | None:
    """(function, extra Python arguments) doing ``module``'s work with constant arguments, or None."""
    kind = type(module).__name__
    if kind == "OnnxReshape" and len(consts) == 1:
        return _reshape, (consts[0],)
    if kind == "OnnxSlice":
        starts, ends, *more = consts + [None] * (4 - len(consts))
        return _slice, (starts, ends, more[0], more[1])
    if kind == "OnnxPadDynamic" and consts and all(p >= 0 for p in consts[0]):
        value = consts[1][0] if len(consts) > 1 and consts[1] is not None else 0.0
        mode = _TORCH_PAD_MODE.get(str(module.mode))
        return (_pad, (consts[0], float(value), mode)) if mode else None
    if kind == "OnnxExpand" and len(consts) == 1:
        return _expand, (consts[0],)
    if kind == "OnnxSqueezeDynamicAxes":
        return _squeeze, (consts[0] if consts else None,)
    if kind == "OnnxUnsqueezeDynamicAxes" and len(consts) == 1:
        return _unsqueeze, (consts[0],)
    if kind == "OnnxReduceSumDynamicAxes":
        return _reduce_sum, (consts[0] if consts else None, bool(module._keepdims),
                             bool(module._noop_with_empty_axes))
    return None


def _call_instead(gm: Any, node: Any, fn: Any, args: tuple[Any, ...]) -> None:
    """Put a ``call_function`` of ``fn(*args)`` in place of ``node`` (every user moves to it)."""
    with gm.graph.inserting_after(node):
        new = gm.graph.call_function(fn, args)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _tidy(gm: Any) -> None:
    """Drop what a rewrite left unused and regenerate the module's code."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _tensor(gm: Any, arg: Any) -> Any:
    """The constant tensor behind a ``get_attr`` argument, or None."""
    if getattr(arg, "op", None) != "get_attr":
        return None
    value = gm
    for part in str(arg.target).split("."):
        value = getattr(value, part)
    return value


def _constant(gm: Any, arg: Any) -> tuple[bool, Any]:
    """(True, Python value) when ``arg`` is None or a small constant tensor of the graph module."""
    if arg is None:
        return True, None
    value = _tensor(gm, arg)
    if value is None or value.numel() > _MAX_CONST:
        return False, None
    return True, value.detach().cpu().reshape(-1).tolist()


def bake_constant_args(gm: Any) -> int:
    """Replace onnx2torch modules whose shape-like arguments are constants by plain functions of Python values
    (what ``torch.export`` can trace); returns how many were replaced."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.args:
            continue
        module = gm.get_submodule(str(node.target))
        found = [_constant(gm, a) for a in node.args[1:]]
        if not all(ok for ok, _ in found):
            continue
        swap = _replacement(module, [v for _, v in found])
        if swap is None:
            continue
        fn, extra = swap
        _call_instead(gm, node, fn, (node.args[0], *extra))
        done += 1
    if done:
        _tidy(gm)
    return done


# --- one-element constants of Add / Sub / Mul / Div as Python numbers (litert-torch's layout pass) -----------

def scalar_operands(gm: Any) -> int:
    """Replace each onnx2torch Add / Sub / Mul / Div of a tensor and a one-element float constant by the same
    operation with a Python number; returns how many. litert-torch moves an op to channels-last only when all its
    tensor inputs are 4-D: a ``[1]`` constant kept every learnable-affine ``scale * x + bias`` of PP-OCRv4's
    backbone (and the hard-swish between) in NCHW, 70 TRANSPOSE ops around its 38 convolutions."""
    import operator

    torch = require("torch", "torch", "converting ONNX models through PyTorch")
    ops = {torch.add: operator.add, torch.sub: operator.sub, torch.mul: operator.mul}
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 2 or node.kwargs:
            continue
        module = gm.get_submodule(str(node.target))
        if type(module).__name__ != "OnnxBinaryMathOperation" or module.broadcast == 1:
            continue
        fn = ops.get(module.math_op_function)
        if fn is None and getattr(module.math_op_function, "__name__", "") == "_onnx_div":
            fn = operator.truediv
        consts = [_tensor(gm, a) for a in node.args]
        k = next((i for i, c in enumerate(consts) if c is not None and c.numel() == 1 and c.dim() <= 1
                  and c.dtype.is_floating_point), None)
        other = node.args[1 - k] if k is not None else None
        if fn is None or k is None or getattr(other, "op", None) in (None, "get_attr"):
            continue
        value = float(consts[k].reshape(()))
        _call_instead(gm, node, fn, (other, value) if k == 1 else (value, other))
        done += 1
    if done:
        _tidy(gm)
    return done


# --- MatMul by a constant matrix as nn.Linear (what the int8 quantizers annotate) ----------------------------

def _bias_of(gm: Any, node: Any, n_out: int) -> tuple[Any, Any] | tuple[None, None]:
    """(the Add node, its constant [n_out] bias) when ``node``'s only user adds one, else (None, None)."""
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None, None
    add = users[0]
    module = gm.get_submodule(str(add.target))
    torch = require("torch", "torch", "converting ONNX models through PyTorch")
    if (type(module).__name__ != "OnnxBinaryMathOperation" or module.math_op_function is not torch.add
            or module.broadcast == 1 or len(add.args) != 2):
        return None, None
    other = add.args[1] if add.args[0] is node else add.args[0]
    bias = _tensor(gm, other)
    if bias is None or bias.dtype != torch.float32 or bias.numel() != n_out or bias.shape[-1:] != (n_out,):
        return None, None
    return add, bias.reshape(n_out)


def linear_layers(gm: Any) -> int:
    """Replace each ``x @ W`` with a constant 2-D float ``W`` (and a constant bias added right after it) by an
    ``nn.Linear``; returns how many. onnx2torch turns ONNX MatMul into ``torch.matmul``, which no PyTorch int8
    quantizer annotates (PT2E's XNNPACK quantizer takes ``linear``): PP-OCRv4's recogniser kept all 13 of its
    fully connected layers, the 6625-class head included, in float32 in its "int8" .tflite (0.58x fp32 size)."""
    torch = require("torch", "torch", "converting ONNX models through PyTorch")
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(str(node.target))).__name__ != "OnnxMatMul":
            continue
        weight = _tensor(gm, node.args[1]) if len(node.args) == 2 else None
        if weight is None or weight.dim() != 2 or weight.dtype != torch.float32:
            continue
        k, n = weight.shape
        add, bias = _bias_of(gm, node, n)
        linear = torch.nn.Linear(k, n, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight.t())
            if bias is not None:
                linear.bias.copy_(bias)
        name = f"edge_sdk_linear_{done}"
        gm.add_submodule(name, linear)
        last = add if add is not None else node
        with gm.graph.inserting_after(last):
            new = gm.graph.call_module(name, (node.args[0],))
        last.replace_all_uses_with(new)
        if add is not None:
            gm.graph.erase_node(add)
        gm.graph.erase_node(node)
        done += 1
    if done:
        _tidy(gm)
    return done


class OnnxTorchToTFLite(TFLiteConverter):
    """ONNX -> PyTorch (onnx2torch) -> .tflite (litert-torch / AI Edge Quantizer); inputs keep the ONNX layout.

    Not in the registry: the route ``onnx2torch`` of (onnx, tflite) names it (converters/routes.py).
    """

    sources = (Framework.ONNX,)
    default_quantizer = "aeq"

    def convert(self, ctx: ConversionContext, precision: Precision) -> list[ArtifactDraft]:
        """Translate the ONNX graph once per context, then convert it as a PyTorch model."""
        check_precision(self, precision)
        from edge_sdk.converters.torch_to_tflite import TorchToTFLite

        sub = self._torch_context(ctx)
        drafts = TorchToTFLite().convert(sub, precision)
        rewrites = getattr(sub.source, "rewrites", {})
        fused, scalars = rewrites.get("hard_swish_fused", 0), rewrites.get("scalar_operands", 0)
        done = [f"{fused} hard-swish patterns (Add/Clip/Mul/Div) as one hardswish each"] if fused else []
        done += [f"{scalars} one-element constants of Add/Sub/Mul/Div as Python numbers"] if scalars else []
        for d in drafts:
            d.tool_versions["onnx2torch"] = version_of("onnx2torch")
            d.notes.insert(0, "ONNX translated to PyTorch ops by onnx2torch (constant-folded by ONNX Runtime), "
                              "then converted by litert-torch; inputs keep the ONNX layout"
                              + (f"; {' and '.join(done)}, which lets litert-torch keep them channels-last"
                                 if done else ""))
        return drafts

    @staticmethod
    def _torch_context(ctx: ConversionContext) -> ConversionContext:
        """The context of the PyTorch translation (made once per conversion, shared by every precision)."""
        key = "onnx2torch"
        sub = ctx.derived.get(key)
        if sub is None:
            require("torch", "torch", "converting ONNX models through PyTorch")
            from edge_sdk.converters.source_torch import TorchSource

            src = ctx.source
            check_lowered(src)  # an ai.onnx.ml op that could not be lowered: its reason, not onnx2torch's
            info: dict[str, Any] = {}
            gm = onnx_to_torch(Path(src.model), ctx.scratch("onnx2torch"), info)
            tsrc = TorchSource(gm, [list(s) for s in src.input_shapes], kind="onnx2torch",
                               input_names=list(src.input_names), input_dtypes=list(src.input_dtypes))
            tsrc.layout = src.layout
            tsrc.rewrites = info  # what onnx_to_torch rewrote, for the notes
            tsrc.output_names = list(src.output_names)
            sub = ConversionContext(tsrc, ctx.workdir / "via_onnx2torch", calibration=ctx.calibration,
                                    options=ctx.options)
            ctx.derived[key] = sub
        return sub
