"""PyTorch sources: an ``nn.Module``, a TorchScript file, a ``torch.export`` program (``.pt2``), or a state_dict
(``.pt`` / ``.pth``) rebuilt with ``--model-class package.module:Class``.

A PyTorch file does not record its input shapes (only ``.pt2`` carries example inputs), so ``--input-shape`` is
required for the others; the model is run once on zeros at load time, which both names its outputs and turns a
wrong shape into a one-line error before any converter starts.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import require
from edge_sdk.bundle import sha256_path
from edge_sdk.converters.source_common import (
    InputDtypes,
    ShapeSpec,
    SourceBase,
    check_shape,
    flatten,
    guess_layout,
    import_class,
    output_names,
    resolve_dtypes,
)
from edge_sdk.errors import SourceModelError
from edge_sdk.formats import Framework

__all__ = ["TORCH_SUFFIXES", "TorchSource", "load_torch_file", "torch_shapes", "with_dynamic"]

TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ts", ".torchscript", ".jit")


class TorchSource(SourceBase):
    """A PyTorch model in eval mode with known input shapes."""

    framework = Framework.PYTORCH

    def __init__(self, model: Any, input_shapes: list[list[int]], path: Path | None = None, kind: str = "module",
                 input_names: list[str] | None = None, input_dtypes: InputDtypes | None = None):
        self.model = model
        self.path = path
        self.sha256 = sha256_path(path) if path else None
        self.kind = kind
        self.input_shapes = input_shapes
        self.input_names = input_names or (["input"] if len(input_shapes) == 1
                                           else [f"input_{i}" for i in range(len(input_shapes))])
        self.input_dtypes = resolve_dtypes(input_dtypes, self.input_names)
        self.layout = guess_layout(input_shapes[0]) if self.input_dtypes[0].startswith("float") else ""
        outs = self.predict([np.zeros(s, dt) for s, dt in zip(input_shapes, self.input_dtypes, strict=True)])
        self.output_names = output_names(self._raw_out) or (
            ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))])

    def example_inputs(self) -> tuple[Any, ...]:
        """Zero tensors of the input shapes."""
        torch = require("torch", "torch")
        return tuple(torch.from_numpy(np.zeros(s, dt)) for s, dt in zip(self.input_shapes, self.input_dtypes,
                                                                         strict=True))

    def predict(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        """Run the model (no grad) and return numpy outputs, flattened from tuples/lists/dicts."""
        torch = require("torch", "torch")
        with torch.no_grad():
            try:
                out = self.model(*[torch.from_numpy(np.ascontiguousarray(x, dt))
                                   for x, dt in zip(inputs, self.input_dtypes, strict=True)])
            except (RuntimeError, ValueError, TypeError, IndexError) as exc:
                shapes = [list(x.shape) for x in inputs]
                first = str(exc).strip().splitlines()[0][:200]
                raise SourceModelError(f"the PyTorch model rejects inputs of shape {shapes} ({first}): "
                                       "pass the --input-shape the model was built for") from None
        self._raw_out = out
        return [t.detach().cpu().numpy() for t in flatten(out)]

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["kind"] = self.kind
        return d


def torch_shapes(input_shape: ShapeSpec | None, what: str) -> tuple[list[list[int]], list[str] | None]:
    """Shapes (and names, for a mapping) of a PyTorch source's inputs; they cannot be read from the file."""
    if input_shape is None:
        raise SourceModelError(f"{what} sources need --input-shape (e.g. 1,3,224,224; for several inputs "
                               "--input-shape input_ids=1,128 --input-shape attention_mask=1,128)")
    if isinstance(input_shape, Mapping):
        return [check_shape(v) for v in input_shape.values()], [str(k) for k in input_shape]
    return [check_shape(input_shape)], None


def load_torch_file(path: Path, input_shape: ShapeSpec | None, model_class: str | None,
                    input_dtypes: InputDtypes | None = None) -> TorchSource:
    """A PyTorch file of any of the accepted kinds, told apart by suffix and by the zip archive's members."""
    torch = require("torch", "torch", "loading PyTorch models")
    if path.suffix == ".pt2":
        try:
            program = torch.export.load(str(path))
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile, KeyError) as exc:
            raise SourceModelError(f"{path} is not a readable torch.export program ({str(exc)[:120]}): "
                                   "re-save it with torch.export.save") from None
        shapes, names = ([[int(d) for d in t.shape] for t in flatten(program.example_inputs[0])], None)
        if input_shape is not None:
            shapes, names = torch_shapes(input_shape, "torch.export")
        dts = input_dtypes or [str(t.dtype).replace("torch.", "") for t in flatten(program.example_inputs[0])]
        return TorchSource(program.module(), shapes, path, "export", names, dts)
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        if any(n.split("/", 1)[-1].startswith("code/") for n in names) or any(n.endswith("constants.pkl")
                                                                             for n in names):
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except RuntimeError as exc:
                raise SourceModelError(f"{path} is not a loadable TorchScript file ({str(exc)[:120]})") from None
            shapes, names = torch_shapes(input_shape, "TorchScript")
            return TorchSource(module.eval(), shapes, path, "torchscript", names, input_dtypes)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SourceModelError(f"{path} is not a readable PyTorch file ({str(exc).splitlines()[0][:120]}): "
                               "the file may be truncated or corrupt; save a state_dict, TorchScript or .pt2") from None
    except pickle.UnpicklingError:  # weights_only refuses a pickled module
        raise SourceModelError(f"{path} holds a pickled object, not a state_dict: save model.state_dict() and "
                               "pass --model-class, or save TorchScript / torch.export") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SourceModelError(f"{path} does not hold a state_dict: save model.state_dict()")
    if not model_class:
        raise SourceModelError(f"{path} is a state_dict: pass --model-class package.module:Class to rebuild "
                               "the model")
    cls = import_class(model_class)
    try:
        module = cls()
        module.load_state_dict(obj, strict=True)
    except (RuntimeError, TypeError) as exc:
        raise SourceModelError(f"state_dict {path.name} does not fit {model_class} "
                               f"({str(exc).splitlines()[0][:160]}): check --model-class") from None
    shapes, names = torch_shapes(input_shape, "state_dict")
    return TorchSource(module.eval(), shapes, path, "state_dict", names, input_dtypes)


def with_dynamic(src: TorchSource, dynamic: Sequence[str]) -> TorchSource:
    """Record the axes ``--dynamic`` names (the ONNX export keeps them symbolic; static tools get them pinned)."""
    from edge_sdk.converters.onnx_shapes import resolve_dynamic_axes

    src.dynamic_axes = {n: resolve_dynamic_axes(dynamic, s, src.layout)
                        for n, s in zip(src.input_names, src.input_shapes, strict=True)} if dynamic else {}
    return src
