"""A test-only third-party runtime plugin: it shows a runtime plugs into edge_sdk with no edit to the SDK.

Everything the SDK needs is here and in the ``*.dist-info/entry_points.txt`` beside this package (what
``pip install`` of a package declaring ``[project.entry-points."edge_sdk.runtimes"] echo = ...`` writes):
put ``tests/plugins`` on ``sys.path`` and ``echo`` is in the runtime registry, the default runtime order,
agent config / target profile validation and the benchmark worker's module list.

The "model" it runs is a JSON file ``{"inputs": [{"name", "shape"}], "outputs": [...], "gain": g}`` stored
as an ``onnx`` artifact; a run returns ``gain * x`` for each input, so a test can tell it really ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.bundle import TensorSpec
from edge_sdk.errors import InferenceError
from edge_sdk.formats import Format

__all__ = ["EchoRuntime", "EchoSession"]


class EchoSession:
    """Returns ``gain * x`` for every input."""

    def __init__(self, model: dict[str, Any]) -> None:
        self.gain = np.float32(model.get("gain", 1.0))
        self.inputs = [TensorSpec(t["name"], list(t["shape"]), "float32") for t in model["inputs"]]
        self.outputs = [TensorSpec(t["name"], list(t["shape"]), "float32") for t in model["outputs"]]

    def run(self, inputs: list[np.ndarray], *, raw: bool = False) -> list[np.ndarray]:
        """Echo each input, scaled."""
        return [np.asarray(x, np.float32) * self.gain for x in inputs]

    def close(self) -> None:
        """Nothing to release."""


class EchoRuntime:
    """A runtime that claims ``onnx`` artifacts holding an echo model (JSON); ranked before every built-in."""

    name = "echo"
    formats = (Format.ONNX,)
    extra = "echo"
    rank = 5  # before onnxruntime (10): the default order puts it first
    bench_modules = ("edge_sdk_echo_runtime",)
    plot_markers = (("onnx", "*"),)

    def is_available(self) -> bool:
        """Always importable: it is pure Python."""
        return True

    def version(self) -> str | None:
        """The plugin's version."""
        return "0.1.0"

    def load(self, path: Path, *, threads: int | None = None) -> EchoSession:
        """Read the echo model; InferenceError when it is not one."""
        try:
            model = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InferenceError(f"{path} is not an echo model ({exc}): write the JSON the echo "
                                 "runtime reads") from None
        return EchoSession(model)
