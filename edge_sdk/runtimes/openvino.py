"""OpenVINO runtime: runs OpenVINO IR (``model.xml`` + ``model.bin``) on the CPU.

Precision: on CPUs with AMX / AVX512-BF16 OpenVINO executes float models in bf16 by default, which
moves logits by ~0.1-0.3. :meth:`OpenVINORuntime.load` therefore defaults to ``precision_hint="f32"``
so results match the source model; pass ``precision_hint=None`` (the device default, usually faster on
such CPUs) once the artifact has been validated that way. NNCF int8 models are unaffected by the hint.

One :class:`OpenVINOSession` owns one reusable ``InferRequest``; inputs are copied into its
preallocated tensors, so a call costs no more than the bare ``InferRequest.infer()``. A lock makes a
session safe to share between threads (calls are serialised).
"""

from __future__ import annotations

import threading
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._deps import has_module, installed_version, require
from edge_sdk.bundle import TensorSpec
from edge_sdk.errors import InferenceError, InputError, first_line
from edge_sdk.formats import Format
from edge_sdk.runtimes.base import check_inputs

__all__ = ["PRECISION_HINTS", "RUNTIME", "OpenVINORuntime", "OpenVINOSession", "runtime"]

#: Accepted values of ``precision_hint``; None (or "default") keeps the device's own choice.
PRECISION_HINTS = ("f32", "f16", "bf16")


#: OpenVINO errors span many lines of C++ locations; these prefixes mark them, the other lines say what is wrong.
OV_TRACE_LINES = ("Exception from", "Check '")
_one_line = partial(first_line, limit=400, skip=OV_TRACE_LINES)


def _resolve_xml(path: Path) -> Path:
    """The .xml of an IR given the .xml itself, its .bin, or a directory holding exactly one .xml."""
    path = Path(path)
    if path.is_dir():
        xmls = sorted(path.glob("*.xml"))
        if len(xmls) != 1:
            raise InferenceError(f"{path} holds {len(xmls)} .xml files: give the path of the OpenVINO .xml itself")
        return xmls[0]
    if path.suffix == ".bin":
        path = path.with_suffix(".xml")
    if not path.is_file():
        raise InferenceError(f"OpenVINO model {path} does not exist: give the path of an existing .xml file")
    if path.suffix != ".xml":
        raise InferenceError(f"{path} is not an OpenVINO IR: give the .xml file (its .bin must sit beside it)")
    if not path.with_suffix(".bin").is_file():
        raise InferenceError(f"OpenVINO weights {path.with_suffix('.bin')} are missing: "
                             "copy the .bin next to the .xml (they are shipped together)")
    return path


def _spec(port: Any) -> TensorSpec:
    shape = [None if d.is_dynamic else d.get_length() for d in port.get_partial_shape()]
    names = port.get_names()
    name = port.get_any_name() if names else f"{port.get_node().get_friendly_name()}"
    return TensorSpec(name=name, shape=shape, dtype=np.dtype(port.get_element_type().to_dtype()).name)


class OpenVINOSession:
    """A compiled OpenVINO model with one reusable infer request."""

    def __init__(self, compiled: Any, *, precision_hint: str | None, threads: int | None) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._lock = threading.Lock()
        self.precision_hint = precision_hint
        self.threads = threads
        #: what the device actually computes in ("f32", "bf16", ...), as reported after compilation
        self.inference_precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.inputs: list[TensorSpec] = [_spec(p) for p in compiled.inputs]
        self.outputs: list[TensorSpec] = [_spec(p) for p in compiled.outputs]
        self._in_dtypes = [np.dtype(s.dtype) for s in self.inputs]
        self._static = all(None not in s.shape for s in self.inputs)
        # static shapes: write straight into the request's own input buffers (no per-call allocation)
        self._in_views = [self._request.get_input_tensor(i).data for i in range(len(self.inputs))] \
            if self._static else []
        self._n_out = len(self.outputs)
        self._tensor_cls = require("openvino", "openvino", "OpenVINO inference").Tensor

    def run(self, inputs: list[np.ndarray], *, raw: bool = False) -> list[np.ndarray]:
        """Run one batch; outputs are numpy copies in model order.

        OpenVINO IR (including NNCF int8) takes and returns float tensors, so ``raw`` changes nothing.
        """
        check_inputs(inputs, self.inputs)
        for x, spec, want in zip(inputs, self.inputs, self._in_dtypes, strict=True):
            if x.dtype != want and not np.can_cast(x.dtype, want, casting="same_kind"):
                raise InputError(f"input {spec.name!r} has dtype {x.dtype}, the model expects {want}")
        request = self._request
        if request is None:
            raise InferenceError("this OpenVINO session is closed: load the model again")
        with self._lock:
            try:
                if self._static:
                    for view, x in zip(self._in_views, inputs, strict=True):
                        view[...] = x
                else:
                    for i, (x, want) in enumerate(zip(inputs, self._in_dtypes, strict=True)):
                        request.set_input_tensor(i, self._tensor_cls(np.ascontiguousarray(x, dtype=want)))
                request.infer()
                return [request.get_output_tensor(i).data.copy() for i in range(self._n_out)]
            except RuntimeError as exc:
                raise InferenceError(f"OpenVINO inference failed: {_one_line(exc)}") from exc

    def close(self) -> None:
        """Release the infer request and the compiled model."""
        self._in_views = []
        self._request = None
        self._compiled = None


class OpenVINORuntime:
    """OpenVINO on the CPU (or another OpenVINO device) for OpenVINO IR artifacts."""

    name = "openvino"
    formats: tuple[Format, ...] = (Format.OPENVINO,)
    extra = "openvino"
    rank = 20
    bench_modules = ("openvino",)
    plot_markers = (("openvino", "^"),)  # (format, matplotlib marker)

    def is_available(self) -> bool:
        """True when the openvino package is importable (not imported here)."""
        return has_module("openvino")

    def version(self) -> str | None:
        """The installed openvino version, or None."""
        return installed_version("openvino") if self.is_available() else None

    def load(self, path: Path, *, threads: int | None = None, precision_hint: str | None = "f32",
             device: str = "CPU", performance_hint: str | None = "LATENCY") -> OpenVINOSession:
        """Read and compile ``path`` (the .xml; the .bin must be beside it).

        ``threads`` sets INFERENCE_NUM_THREADS; ``precision_hint`` is "f32" (default, faithful),
        "bf16", "f16", or None / "default" for the device's own choice (bf16 on AMX CPUs);
        ``performance_hint`` "LATENCY" suits batch-1 calls on a device.
        """
        ov = require("openvino", "openvino", "OpenVINO inference")
        xml = _resolve_xml(path)
        if precision_hint in ("", "default"):
            precision_hint = None
        if precision_hint is not None and precision_hint not in PRECISION_HINTS:
            raise InferenceError(f"unknown OpenVINO precision_hint {precision_hint!r}: choose from "
                                 f"{', '.join(PRECISION_HINTS)} or None for the device default")
        if threads is not None and threads < 1:
            raise InferenceError(f"threads must be >= 1, got {threads}: pass a positive count or None")
        config: dict[str, Any] = {}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if precision_hint is not None:
            config["INFERENCE_PRECISION_HINT"] = precision_hint
        if performance_hint:
            config["PERFORMANCE_HINT"] = performance_hint
        core = ov.Core()
        try:
            model = core.read_model(str(xml))
        except RuntimeError as exc:
            why = _one_line(exc).replace(str(xml), xml.name)  # OpenVINO repeats the full path: once is enough
            raise InferenceError(f"cannot read OpenVINO model {xml} ({why}): the .xml/.bin pair is "
                                 "corrupt or truncated; copy both files again") from None
        try:
            compiled = core.compile_model(model, device, config)
        except RuntimeError as exc:
            raise InferenceError(f"cannot compile OpenVINO model {xml} on {device} ({_one_line(exc)}): check the "
                                 "device name and config, or re-convert the model") from None
        return OpenVINOSession(compiled, precision_hint=precision_hint, threads=threads)


#: The instance the runtime registry picks up (``runtime``: the older name).
RUNTIME = runtime = OpenVINORuntime()
