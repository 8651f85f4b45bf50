"""Keep third-party chatter out of the SDK's own output, and keep OpenVINO/NNCF telemetry from forking.

A newcomer's ``make demo`` printed pages that were not the SDK's: TensorFlow/XLA C++ logs (``I0000 ... oneDNN``,
``WARNING: All log messages before absl::InitializeLog()``), torchao ``Failed to load`` lines, PyTorch's glog-style
``W1206 ... _pytree.py`` warnings, ``FutureWarning``s from inside torch, and — the one that matters — ``os.fork()
was called ... JAX is multithreaded, so this will likely lead to a deadlock`` once per OpenVINO/NNCF call.

That fork is ``openvino_telemetry``: with no consent file it *sends by default* and, on Linux, does each send in a
``multiprocessing.Process`` (fork) so a missing network cannot hang it; litert-torch has loaded JAX by then, so
every OpenVINO conversion forked a multithreaded process. :func:`no_openvino_telemetry` declines consent in this
process only (no file in the user's home is written) and is always applied: it is a hang risk, not noise.

:func:`quiet_third_party` is called once, first thing, by the CLI's ``main`` and by ``examples/demo.py``. It only
lowers *third-party* loggers and ignores warnings *raised from third-party modules*; the SDK's own logs and
warnings are untouched. ``--verbose`` or ``EDGE_SDK_VERBOSE=1`` leaves everything as the libraries set it. Env
vars are only defaulted, so a user's explicit ``TF_CPP_MIN_LOG_LEVEL=0`` still wins. Nothing heavy is imported
here: levels are applied when (if) each library is imported, through a small import hook.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["THIRD_PARTY_MODULES", "is_verbose", "native_noise_filtered", "no_openvino_telemetry", "quiet_third_party"]

# Modules whose warnings and logs are not the SDK's (``copyreg``: torch's pytree FutureWarning is attributed there).
THIRD_PARTY_MODULES = (
    "torch", "torchao", "torchvision", "tensorflow", "tf_keras", "keras", "jax", "jaxlib", "flax", "absl", "onnx",
    "onnxscript", "onnx_ir", "onnxruntime", "onnx2tf", "onnx_graphsurgeon", "tf2onnx", "openvino", "nncf",
    "coremltools", "litert_torch", "ai_edge_torch", "ai_edge_litert", "ai_edge_quantizer", "google.protobuf",
    "tensorflow_probability", "flatbuffers", "copyreg", "h5py", "ml_dtypes", "optree", "sympy", "mediapipe",
)
# C++ logging of TensorFlow / XLA / TFLite (2 = errors only) and glog users; defaults, never overrides
_ENV_DEFAULTS = {"TF_CPP_MIN_LOG_LEVEL": "2", "GLOG_minloglevel": "2", "ABSL_MIN_LOG_LEVEL": "2"}
# libraries that (re)set their logger levels when imported: lowered right after their import instead
_AFTER_IMPORT_LEVELS = {
    "torch": ("torch", "torch.onnx", "torch.utils", "torch._dynamo", "torch.export", "torch.fx"),
    "tensorflow": ("tensorflow", "h5py"), "nncf": ("nncf",), "tf2onnx": ("tf2onnx",),
    "onnx2tf": ("onnx2tf",), "coremltools": ("coremltools",), "jax": ("jax", "jax._src"),
}
# lines the C++ side writes to fd 2 *while the library loads* (static initialisers: no env var or level stops them)
_LOAD_NOISE = re.compile(r"WARNING: All log messages before absl::InitializeLog"
                         r"|^[IW]\d{4} .*\] oneDNN custom operations|^INFO: Created TensorFlow Lite XNNPACK delegate")
_FILTER_LOAD_STDERR = ("tensorflow", "tf_keras", "coremltools", "litert_torch", "ai_edge_litert")
_state: dict[str, bool] = {"quiet": False, "telemetry": False}


def is_verbose(verbose: bool = False) -> bool:
    """True when third-party output should be left alone: ``--verbose`` or ``EDGE_SDK_VERBOSE`` set to 1/true."""
    return verbose or os.environ.get("EDGE_SDK_VERBOSE", "").strip().lower() in {"1", "true", "yes", "on"}


def quiet_third_party(verbose: bool = False) -> None:
    """Silence third-party logs and warnings for this process (unless verbose); always opt out of OV telemetry.

    Call it before the first heavy import (TensorFlow reads ``TF_CPP_MIN_LOG_LEVEL`` once, when it loads).
    Idempotent. Subprocesses inherit the env defaults, so worker processes stay quiet too.
    """
    no_openvino_telemetry()
    if is_verbose(verbose) or _state["quiet"]:
        return
    _state["quiet"] = True
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    pattern = r"(" + "|".join(m.replace(".", r"\.") for m in THIRD_PARTY_MODULES) + r")(\.|$)"
    warnings.filterwarnings("ignore", module=pattern)
    # loggers no library resets: lowered now (creating them early is harmless for plain ``logging.Logger`` users)
    for name in ("torchao", "absl", "openvino", "onnxscript", "onnx_ir", "onnxruntime", "litert_torch",
                 "ai_edge_torch", "ai_edge_litert", "ml_dtypes", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for module, loggers in _AFTER_IMPORT_LEVELS.items():
        _after_import(module, lambda _m, names=loggers: _lower(names))
    _after_import("absl.logging", lambda m: m.set_verbosity(m.ERROR))
    _HOOK.filter_stderr.update(_FILTER_LOAD_STDERR)
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def native_noise_filtered() -> contextlib.AbstractContextManager[None]:
    """Around a native call that logs to fd 2 regardless of any setting (LiteRT's ``INFO: Created TensorFlow Lite
    XNNPACK delegate``): drops the known noise lines once :func:`quiet_third_party` is active, else does nothing."""
    return _FilteredFd2() if _state["quiet"] else contextlib.nullcontext()


def no_openvino_telemetry() -> None:
    """Decline ``openvino_telemetry`` consent in this process, so OpenVINO and NNCF neither send nor fork.

    Both ``openvino.convert_model`` and NNCF ask ``OptInChecker.check`` each time their ``Telemetry`` singleton is
    (re)initialised; answering DECLINED there covers both. ``openvino_telemetry`` is a small pure-Python package
    (no ``openvino`` import); when it is not installed there is nothing to do.
    """
    if _state["telemetry"]:
        return
    _state["telemetry"] = True
    if "openvino_telemetry" in sys.modules:
        _decline(sys.modules["openvino_telemetry"])
    else:
        _after_import("openvino_telemetry", _decline)


def _decline(_module: ModuleType) -> None:
    """Make every consent check answer DECLINED and turn off an already created singleton."""
    try:
        from openvino_telemetry.main import Telemetry
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # a layout this code does not know: leave it (the fork warning would then show)
        return
    OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED  # type: ignore[method-assign]
    instance = getattr(Telemetry, "_SingletonMetaClass__single_instance", None)
    if instance is not None:
        instance.consent = False


def _lower(names: Sequence[str]) -> None:
    """Set the named loggers to ERROR (after their library configured them)."""
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a watched module finishes executing (a post-import hook; nothing is preloaded)."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[ModuleType], Any]]] = {}
        self.filter_stderr: set[str] = set()  # top-level names: their modules' load-time fd-2 lines are filtered
        self.filtering = 0  # nesting depth: only the outermost filtered import redirects fd 2

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        """Find the real spec with the other finders and wrap its loader when ``fullname`` is watched."""
        filtered = not self.filtering and fullname.partition(".")[0] in self.filter_stderr
        if fullname not in self.callbacks and not filtered:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader, self.callbacks.pop(fullname, []), filtered)
                return spec
            if spec is not None:
                return spec
        return None


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the callbacks (their errors never break the import)."""

    def __init__(self, real: Any, callbacks: list[Callable[[ModuleType], Any]], filter_stderr: bool = False) -> None:
        self.real, self.callbacks, self.filter_stderr = real, callbacks, filter_stderr

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        """The real loader's module object."""
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        """Execute the module (its load-time fd-2 noise filtered out when asked), then apply the callbacks."""
        if self.filter_stderr:
            _HOOK.filtering += 1
            try:
                with _FilteredFd2():
                    self.real.exec_module(module)
            finally:
                _HOOK.filtering -= 1
        else:
            self.real.exec_module(module)
        for callback in self.callbacks:
            try:
                callback(module)
            except Exception:  # quieting must never break an import
                pass

    def __getattr__(self, name: str) -> Any:
        """Everything else (``get_source``, ``is_package``, resource readers) is the real loader's."""
        return getattr(self.real, name)


_HOOK = _AfterImport()


class _FilteredFd2:
    """Send fd 2 to a temp file for the duration, then write back every line that is not known load noise."""

    def __enter__(self) -> None:
        sys.stderr.flush()
        self.saved, self.tmp = os.dup(2), tempfile.TemporaryFile()
        os.dup2(self.tmp.fileno(), 2)

    def __exit__(self, *exc: object) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        kept = [ln for ln in self.tmp.read().decode(errors="replace").splitlines(True) if not _LOAD_NOISE.search(ln)]
        self.tmp.close()
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def _after_import(module: str, callback: Callable[[ModuleType], Any]) -> None:
    """Run ``callback(module)`` now if ``module`` is imported, else right after its import."""
    if module in sys.modules:
        try:
            callback(sys.modules[module])
        except Exception:  # quieting must never break the caller
            pass
        return
    _HOOK.callbacks.setdefault(module, []).append(callback)
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
