"""The runtime protocol: one module per inference runtime, all behind the same small interface.

``Runtime.is_available()`` checks with ``importlib.util.find_spec`` (no import);
``Runtime.load(path)`` imports the runtime and returns a :class:`Session`.
Sessions take and return float32 numpy arrays by default: for int8 / uint8 quantized inputs and
outputs they quantize and dequantize with the tensor's scale / zero-point (``raw=True`` skips that).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edge_sdk.bundle import TensorSpec
from edge_sdk.errors import InferenceError, InputError, first_line
from edge_sdk.formats import Format

__all__ = [
    "Runtime",
    "Session",
    "cast_integers",
    "check_inputs",
    "check_model_file",
    "check_threads",
    "cpuinfo",
    "dequantize",
    "quantize",
    "run_failed",
]


def cpuinfo(*keys: str) -> dict[str, str]:
    """The first value of each of ``keys`` in Linux ``/proc/cpuinfo`` (``flags``, ``model name``, ...); the keys
    it lacks (or every key, where there is no such file) are left out."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return {}
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in keys and key not in found and value.strip():
            found[key] = value.strip()
            if len(found) == len(keys):
                break
    return found


@runtime_checkable
class Session(Protocol):
    """A loaded model ready to run."""

    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    def run(self, inputs: list[np.ndarray], *, raw: bool = False) -> list[np.ndarray]:
        """Run on one batch; inputs in model order; returns outputs in model order."""
        ...

    def close(self) -> None:
        """Release the runtime's resources."""
        ...


class Runtime(Protocol):
    """An inference runtime able to run artifacts of some formats.

    Optional facts the registry reads with defaults (edge_sdk/runtimes/registry.py): ``rank`` (int, place in the
    default runtime order, lower first; 100 when absent), ``bench_modules`` (modules ``load`` imports, for the
    benchmark's memory baseline) and ``plot_markers`` ((format, matplotlib marker) pairs).
    """

    name: str
    formats: tuple[Format, ...]
    extra: str  # the pip extra that installs it

    def is_available(self) -> bool:
        """True when the runtime can be imported here (checked without importing it)."""
        ...

    def version(self) -> str | None:
        """The installed runtime's version, or None."""
        ...

    def load(self, path: Path, *, threads: int | None = None) -> Session:
        """Load an artifact; raise InferenceError (or MissingDependencyError) on failure."""
        ...


def quantize(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """float -> the spec's integer dtype using its scale / zero-point."""
    info = np.iinfo(spec.dtype)
    q = np.round(x / np.float32(spec.scale)) + int(spec.zero_point or 0)
    return np.clip(q, info.min, info.max).astype(spec.dtype)


def dequantize(q: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """The spec's integer dtype -> float32."""
    return ((q.astype(np.float32) - np.float32(spec.zero_point or 0)) * np.float32(spec.scale)).astype(np.float32)


def cast_integers(x: np.ndarray, want: np.dtype, name: str) -> np.ndarray:
    """An integer array (token ids, masks) as the integer dtype the model takes — TFLite converters turn int64
    inputs into int32 — refusing values the narrower type cannot hold instead of wrapping them."""
    if x.size:
        info = np.iinfo(want)
        lo, hi = int(x.min()), int(x.max())
        if lo < info.min or hi > info.max:
            raise InputError(f"input {name!r} holds values {lo}..{hi} that {want} cannot represent: the model "
                             f"takes {want}")
    return x.astype(want)


def check_inputs(inputs: list[np.ndarray], specs: list[TensorSpec]) -> None:
    """Raise InputError when the count, shape or finiteness of inputs does not fit the model.

    On the hot path of every inference: plain loops (no generators), one vectorised finiteness test.
    """
    if len(inputs) != len(specs):
        raise InputError(f"model takes {len(specs)} input(s) ({', '.join(s.name for s in specs)}), "
                         f"got {len(inputs)}")
    for x, spec in zip(inputs, specs, strict=True):
        shape, want = x.shape, spec.shape
        ok = len(shape) == len(want)
        if ok:
            for w, g in zip(want, shape, strict=True):
                if w is not None and w != -1 and w != g:
                    ok = False
                    break
        if not ok:
            raise InputError(f"input {spec.name!r} has shape {list(shape)}, the model expects {list(want)}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise InputError(f"input {spec.name!r} contains NaN or Inf")


def check_model_file(path: Path) -> None:
    """Refuse a missing or empty model file with a one-line InferenceError, before the runtime reports it in its
    own words (a parser error for an empty file)."""
    if not path.is_file():
        raise InferenceError(f"model file {path} does not exist: check the bundle path")
    if path.stat().st_size == 0:
        raise InferenceError(f"model file {path} is empty: re-copy the bundle")


def check_threads(threads: int | None) -> None:
    """Refuse a thread count below 1 (None lets the runtime choose)."""
    if threads is not None and threads < 1:
        raise InferenceError(f"threads must be >= 1, got {threads}: pass a positive thread count")


def run_failed(runtime: str, path: Path, exc: BaseException) -> InferenceError:
    """The error of a loaded model that failed to run (inputs it does not take, most often): raise it ``from None``
    so the runtime's traceback stays out of the one-line message."""
    return InferenceError(f"{runtime} failed to run {path.name} ({first_line(exc)}): check the inputs match the "
                          "model's inputs")
