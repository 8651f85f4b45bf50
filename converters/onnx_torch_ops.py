"""ONNX ops onnx2torch 1.5.15 has no converter for, added to its registry for the onnx2torch route
(converters/onnx_torch_route.py). Imported only after onnx2torch itself.

- ``LSTM`` (opsets 7, 14, 22) -> ``torch.nn.LSTM``: ONNX packs the gates i, o, f, c and torch i, f, g, o, so the
  weight rows are reordered; ``reverse`` runs a forward LSTM on the time-flipped sequence; ``layout=1``
  (batch first) is transposed in and out. Peepholes, ``clip``, ``input_forget``, non-default activations and a
  ``sequence_lens`` shorter than the sequence are refused (NotImplementedError, reported in one line).
  The recurrent nets of the corpus (Silero VAD, ddddocr's CRNN) use plain LSTMs.
- Ops whose newer opsets (18-23) only moved or added optional things onnx2torch has no entry for (``Pad`` 18+,
  ``Reduce*`` 18+, ``Split`` 18, ``Resize`` 18/19, ``Reshape`` / ``Shape`` / ``Cast`` 19/21, ...: what
  ``torch.onnx.export`` writes today at opset 18) use onnx2torch's newest older converter; a node that uses
  what the newer opset added (Pad ``axes``, Resize ``antialias``, a computed reduction axis) is refused.
  :func:`prepare_graph` first moves a constant Reduce ``axes`` input (opset 18) back into the attribute.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prepare_graph", "register_extra_converters"]

_DEFAULT_ACTIVATIONS = ("Sigmoid", "Tanh", "Tanh")
_GATES = (0, 2, 3, 1)  # torch's i, f, g, o taken from ONNX's i, o, f, c


def _lstm_module(torch: Any, common: Any) -> type:
    class OnnxLSTM(torch.nn.Module, common.OnnxToTorchModule):
        """One ONNX LSTM node as ``torch.nn.LSTM`` (inputs X[, initial_h][, initial_c]; outputs Y, Y_h, Y_c)."""

        def __init__(self, lstm: Any, reverse: bool, batch_first: bool, has_h: bool, has_c: bool,
                     seq_lens: list[int] | None) -> None:
            super().__init__()
            self.lstm, self.reverse, self.batch_first = lstm, reverse, batch_first
            self.has_h, self.has_c, self.seq_lens = has_h, has_c, seq_lens

        def forward(self, x: Any, *states: Any) -> tuple[Any, Any, Any]:
            given = list(states)
            h0 = given.pop(0) if self.has_h else None
            c0 = given.pop(0) if self.has_c else None
            if self.batch_first:
                x = x.transpose(0, 1)
                h0 = None if h0 is None else h0.transpose(0, 1)
                c0 = None if c0 is None else c0.transpose(0, 1)
            steps, batch = int(x.shape[0]), int(x.shape[1])
            if self.seq_lens is not None and any(n != steps for n in self.seq_lens):
                raise NotImplementedError("ONNX LSTM with sequence_lens shorter than the sequence")
            dirs, hidden = (2 if self.lstm.bidirectional else 1), self.lstm.hidden_size
            h0 = x.new_zeros(dirs, batch, hidden) if h0 is None else h0
            c0 = x.new_zeros(dirs, batch, hidden) if c0 is None else c0
            if self.reverse:
                x = torch.flip(x, [0])
            y, (hn, cn) = self.lstm(x, (h0.contiguous(), c0.contiguous()))
            if self.reverse:
                y = torch.flip(y, [0])
            y = y.reshape(steps, batch, dirs, hidden).permute(0, 2, 1, 3)  # [T, D, B, H]
            if self.batch_first:
                return y.permute(2, 0, 1, 3), hn.transpose(0, 1), cn.transpose(0, 1)
            return y, hn, cn

    return OnnxLSTM


def _convert_lstm(node: Any, graph: Any) -> Any:
    import torch
    from onnx2torch.utils import common

    attrs = node.attributes
    names = list(node.input_values) + [""] * (8 - len(node.input_values))
    x, w, r, b, seq_lens, h0, c0, peep = names
    direction = str(attrs.get("direction", "forward"))
    dirs = 2 if direction == "bidirectional" else 1
    acts = tuple(str(a) for a in attrs.get("activations", _DEFAULT_ACTIVATIONS * dirs))
    plain = acts == _DEFAULT_ACTIVATIONS * dirs and not int(attrs.get("input_forget", 0))
    if peep or attrs.get("clip") is not None or not plain:
        raise NotImplementedError("ONNX LSTM with peepholes, clip, input_forget or non-default activations")
    if any(n not in graph.initializers for n in (w, r) if n) or (b and b not in graph.initializers):
        raise NotImplementedError("ONNX LSTM whose weights are computed, not constants")
    if seq_lens and seq_lens not in graph.initializers:
        raise NotImplementedError("ONNX LSTM with a computed sequence_lens")
    weight_ih, weight_hh = graph.initializers[w].to_torch(), graph.initializers[r].to_torch()
    hidden = int(attrs.get("hidden_size", weight_hh.shape[-1]))
    bias = graph.initializers[b].to_torch() if b else torch.zeros(dirs, 8 * hidden)
    lstm = torch.nn.LSTM(int(weight_ih.shape[-1]), hidden, bidirectional=dirs == 2)

    def gates(t: Any) -> Any:
        return torch.cat([t.reshape(4, hidden, *t.shape[1:])[g] for g in _GATES])

    with torch.no_grad():
        for d in range(dirs):
            sfx = "_reverse" if d else ""
            getattr(lstm, f"weight_ih_l0{sfx}").copy_(gates(weight_ih[d]))
            getattr(lstm, f"weight_hh_l0{sfx}").copy_(gates(weight_hh[d]))
            getattr(lstm, f"bias_ih_l0{sfx}").copy_(gates(bias[d, :4 * hidden]))
            getattr(lstm, f"bias_hh_l0{sfx}").copy_(gates(bias[d, 4 * hidden:]))
    lengths = graph.initializers[seq_lens].to_torch().reshape(-1).tolist() if seq_lens else None
    module = _lstm_module(torch, common)(lstm.eval(), direction == "reverse", int(attrs.get("layout", 0)) == 1,
                                         bool(h0), bool(c0), lengths)
    inputs = tuple(n for n in (x, h0, c0) if n)
    return common.OperationConverterResult(torch_module=module,
                                           onnx_mapping=common.OnnxMapping(inputs=inputs,
                                                                           outputs=node.output_values))


_REDUCE = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
           "ReduceLogSumExp", "ReduceSumSquare")
_ALIASED = (*_REDUCE, "Pad", "Split", "Resize", "Cast", "Constant", "Equal", "Identity", "Reshape", "Shape", "Size",
            "Squeeze", "Unsqueeze", "Transpose", "Flatten", "AveragePool", "ScatterND", "ScatterElements",
            "ConstantOfShape")


def prepare_graph(proto: Any) -> None:
    """Opset 18 Reduce nodes with a constant ``axes`` input: the axes back in the attribute (what onnx2torch reads)."""
    from onnx import helper, numpy_helper

    if max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0) < 18:
        return
    consts = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in _REDUCE and len(node.input) > 1 and node.input[1] in consts:
            axes = [int(a) for a in numpy_helper.to_array(consts[node.input[1]]).reshape(-1)]
            del node.input[1:]
            node.attribute.append(helper.make_attribute("axes", axes))


def _refuse_new_features(node: Any) -> None:
    op, attrs, inputs = node.operation_type, node.attributes, list(node.input_values)
    why = ""
    if op == "Pad" and len(inputs) > 3 and inputs[3]:
        why = "Pad with an axes input"
    elif op in _REDUCE and len(inputs) > 1 and inputs[1]:
        why = f"{op} with computed axes"
    elif op in _REDUCE and int(attrs.get("noop_with_empty_axes", 0)) and not attrs.get("axes"):
        why = f"{op} with noop_with_empty_axes"
    elif op == "Resize" and (int(attrs.get("antialias", 0)) or attrs.get("axes")):
        why = "Resize with antialias or axes"
    elif op == "AveragePool" and any(int(d) != 1 for d in attrs.get("dilations", [])):
        why = "dilated AveragePool"
    if why:
        raise NotImplementedError(f"{why} (opset 18+) is not supported by onnx2torch")


def _alias(older: Any) -> Any:
    def convert(node: Any, graph: Any) -> Any:
        _refuse_new_features(node)
        return older(node, graph)

    return convert


def register_extra_converters() -> None:
    """Add the converters above to onnx2torch's registry (once; versions it already covers are left alone)."""
    from onnx import defs
    from onnx2torch.node_converters import registry

    table = registry._CONVERTER_REGISTRY

    def missing(op: str, version: int) -> bool:
        return registry.OperationDescription(domain=defs.ONNX_DOMAIN, operation_type=op, version=version) not in table

    for version in (7, 14, 22):
        if missing("LSTM", version):
            registry.add_converter(operation_type="LSTM", version=version)(_convert_lstm)
    hard_swish = registry.OperationDescription(domain=defs.ONNX_DOMAIN, operation_type="HardSwish", version=14)
    for version in range(6, 14):  # the route writes HardSwish into older graphs too (onnx_to_torch)
        if missing("HardSwish", version) and hard_swish in table:
            registry.add_converter(operation_type="HardSwish", version=version)(table[hard_swish])
    newest = defs.onnx_opset_version()
    for op in _ALIASED:
        versions = sorted({defs.get_schema(op, max_inclusive_version=v).since_version for v in range(13, newest + 1)})
        for version in versions:
            known = [d.version for d in table if d.operation_type == op and d.domain == defs.ONNX_DOMAIN
                     and d.version < version]
            if missing(op, version) and known:
                older = table[registry.OperationDescription(domain=defs.ONNX_DOMAIN, operation_type=op,
                                                            version=max(known))]
                registry.add_converter(operation_type=op, version=version)(_alias(older))
