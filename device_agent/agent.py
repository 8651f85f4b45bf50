"""The device agent core: load a bundle, pick and verify the artifact this device can run, and predict.

:class:`Agent` chooses the artifact once at load (edge_sdk/runtimes/selection.py: an explicit ``artifact`` key,
else the build's selection when runnable here, else the first artifact of the first installed runtime in
``runtime_order``, by default the runtime registry's order), checks its
sha256, loads it, and precomputes everything a call needs (input order, dtypes, layout permutations,
output names), so :meth:`Agent.predict` adds only a few checks around the runtime call.

Telemetry (optional, :meth:`Agent.set_telemetry`): each call also feeds a
:class:`~edge_sdk.device_agent.aggregates.WindowAggregator` with its first input tensor (drift statistics,
sampled before the run), its latency and score row (classifiers: class and confidence worked out in bulk), or its
error kind (``input``, ``preprocess``, ``runtime``; ``output`` for NaN/Inf classifier scores). Every
:class:`Prediction` has an ``id``; a classifier remembers the last ``remember`` ids with their predicted class so
ground truth can be fed back later (:meth:`Agent.feedback`).
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edge_sdk.bundle import Bundle, TensorSpec
from edge_sdk.device_agent.metrics import InferenceStats, TelemetryTee
from edge_sdk.device_agent.prediction import Prediction, is_probabilities, top_k_classes
from edge_sdk.errors import BundleError, InferenceError, InputError
from edge_sdk.preprocessing import Preprocessing
from edge_sdk.runtimes import Runtime, default_order
from edge_sdk.runtimes.selection import check_order, select_artifact

if TYPE_CHECKING:
    from edge_sdk.device_agent.aggregates import WindowAggregator
    from edge_sdk.device_agent.capture import Capture

__all__ = ["DEFAULT_REMEMBER", "DEFAULT_RUNTIME_ORDER", "Agent", "Prediction"]

log = logging.getLogger("edge_sdk.agent")

#: the registry's default order when this module was imported (Agent itself asks the registry at construction)
DEFAULT_RUNTIME_ORDER: tuple[str, ...] = default_order()
_TRANSPOSE = {("NCHW", "NHWC"): (0, 2, 3, 1), ("NHWC", "NCHW"): (0, 3, 1, 2)}
_LOAD_HINTS = ("precision_hint", "device", "performance_hint", "delegate")  # artifact.runtime keys passed to load
DEFAULT_REMEMBER = 10_000  # prediction ids a classifier keeps for feedback


class Agent:
    """A bundle loaded for inference on this device.

    Attributes: ``bundle``, ``artifact`` (the :class:`~edge_sdk.bundle.Artifact` being run), ``runtime_name``,
    ``selection_reason``, ``session``, ``task`` ("classification" or "other"), ``labels``, ``preprocessing``,
    ``model_version`` ("name:version"), ``input_specs`` / ``output_names`` (the source model's, in its layout),
    ``num_classes`` (classifiers, when the output shape is static). ``remember``: how many recent prediction ids
    (with their predicted class) a classifier keeps for :meth:`feedback`.
    """

    def __init__(self, bundle_or_path: Bundle | str | os.PathLike, *, runtime_order: list[str] | tuple[str, ...] |
                 None = None, artifact: str | None = None, threads: int | None = None, verify: bool = True,
                 top_k: int = 5, remember: int = DEFAULT_REMEMBER) -> None:
        self.bundle = bundle_or_path if isinstance(bundle_or_path, Bundle) else Bundle.load(bundle_or_path)
        m = self.bundle.manifest
        order = check_order(runtime_order)  # None: the registry's default order (plugins included)
        if top_k < 1:
            raise InferenceError(f"top_k must be >= 1, got {top_k}")
        if remember < 0:
            raise InferenceError(f"remember must be >= 0, got {remember}")
        self.runtime_order = order
        self.remember = int(remember)
        self._telemetry: WindowAggregator | None = None
        self.stats = InferenceStats()  # cumulative counts of every call, any source (the HTTP server's /metrics)
        self._sink: Any = self.stats  # what each call feeds: the stats, plus the telemetry aggregator once set
        self._capture: Capture | None = None
        self._recent: OrderedDict[str, int] = OrderedDict()
        self._unresolved: list[tuple[str, np.ndarray]] = []  # (id, scores) whose class is not worked out yet
        self._recent_lock = threading.Lock()
        self.top_k = int(top_k)
        self.model_version = f"{m.name}:{m.version}"
        self.task = "classification" if str(m.task) == "classification" else "other"
        self.labels: list[str] | None = list(m.labels) if m.labels else None
        try:
            self.preprocessing: Preprocessing | None = Preprocessing.from_dict(m.preprocessing)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"manifest preprocessing of {self.bundle.root} is malformed ({exc}): rebuild the "
                              "bundle") from None
        self.artifact, rt, self.selection_reason = select_artifact(self.bundle, order, artifact)
        self.runtime_name = rt.name
        self.runtime_version = rt.version()
        if verify:
            self.bundle.verify(self.artifact)
        self.session = self._load(rt, threads)
        log.info("%s: running %s with %s %s (%s)", self.model_version, self.artifact.key, rt.name,
                 self.runtime_version or "", self.selection_reason)
        self._lock = threading.Lock()
        self._prepare_io()

    # ---- selection and loading -------------------------------------------------------------------------------

    def _load(self, rt: Runtime, threads: int | None) -> Any:
        hints = self.artifact.runtime
        params = inspect.signature(rt.load).parameters
        kwargs = {k: hints[k] for k in _LOAD_HINTS if k in hints and k in params}
        path = self.bundle.path_of(self.artifact)
        compiled = self._accelerated(rt, hints, params)
        if compiled is not None:
            path, kwargs["delegate"] = compiled
        return rt.load(path, threads=threads, **kwargs)

    def _accelerated(self, rt: Runtime, hints: dict[str, Any], params: Any) -> tuple[Path, str] | None:
        """(compiled file, delegate) when the artifact ships an accelerator build (the Edge TPU's
        ``_edgetpu.tflite``) whose delegate this device has; None keeps the portable file."""
        entry = hints.get("edgetpu")
        if not isinstance(entry, dict) or not entry.get("path") or "delegate" not in params:
            return None
        delegate = str(entry.get("delegate") or "edgetpu")
        has = getattr(rt, "has_delegate", None)
        if has is None or not has(delegate):
            self.selection_reason += f"; {entry['path']} not used: no {delegate} runtime on this device"
            return None
        path = self.bundle.root / str(entry["path"])
        if not path.is_file():
            raise BundleError(f"{self.artifact.key}: {entry['path']} is missing from bundle {self.bundle.root}: "
                              "re-fetch or rebuild the bundle")
        self.selection_reason += f"; running {entry['path']} with the {delegate} delegate"
        return path, delegate

    # ---- precomputation --------------------------------------------------------------------------------------

    def _prepare_io(self) -> None:
        m = self.bundle.manifest
        sess_in: list[TensorSpec] = list(self.session.inputs)
        self.input_specs: list[TensorSpec] = list(m.inputs) if len(m.inputs) == len(sess_in) else \
            [TensorSpec(s.name, list(s.shape), "float32" if s.scale is not None else s.dtype) for s in sess_in]
        self.input_names = [s.name for s in self.input_specs]
        self._name_index = {n: k for k, n in enumerate(self.input_names)}
        self._shapes = [tuple(-1 if d is None or d == -1 else int(d) for d in s.shape) for s in self.input_specs]
        self._static = [-1 not in s for s in self._shapes]
        self._dtypes = [np.dtype(s.dtype or "float32") for s in self.input_specs]
        self._perms = self._permutations()
        out_specs = list(self.session.outputs)
        self.output_names = [s.name for s in out_specs]
        self._out_order: list[int] | None = None
        if len(m.outputs) == len(out_specs):
            measured = (self.artifact.validation.checks or {}).get("output_order")  # found by validation
            order = (list(measured) if isinstance(measured, list) and sorted(measured) == list(range(len(out_specs)))
                     else self._match_outputs(m.outputs, out_specs))
            if order is not None:
                self.output_names = [s.name for s in m.outputs]
                self._out_order = None if order == list(range(len(order))) else order
        self._classifier = self.task == "classification" and len(out_specs) >= 1
        self._probabilities: bool | None = None
        self.num_classes: int | None = None
        if self._classifier:
            dims = list(out_specs[0].shape[1:])
            if dims and all(isinstance(d, int) and d > 0 for d in dims):
                self.num_classes = int(np.prod(dims))
        if self.labels is not None and self._classifier:
            n = int(np.prod([d for d in out_specs[0].shape[1:] if d]))
            if n and len(self.labels) != n:
                log.warning("%d labels for %d classes: labels ignored", len(self.labels), n)
                self.labels = None
        self._label_index = {name: i for i, name in enumerate(self.labels or [])}

    def _permutations(self) -> list[tuple[int, ...] | None]:
        hints, m = self.artifact.runtime, self.bundle.manifest
        n = len(self.input_specs)
        if isinstance(hints.get("input_permutations"), list) and len(hints["input_permutations"]) == n:
            return [tuple(p) if p else None for p in hints["input_permutations"]]
        perms: list[tuple[int, ...] | None] = []
        for spec in self.input_specs:
            if len(spec.shape) != 4:
                perms.append(None)
            elif hints.get("input_permutation"):
                perms.append(tuple(hints["input_permutation"]))
            else:
                src = spec.layout or m.source.get("layout") or hints.get("source_input_layout")
                perms.append(_TRANSPOSE.get((src, hints.get("input_layout"))))
        for k, p in enumerate(perms):
            if p is not None:
                log.info("input %r: transposed %s at every call (artifact layout %s)", self.input_names[k], p,
                         hints.get("input_layout"))
        return perms

    @staticmethod
    def _match_outputs(want: list[TensorSpec], got: list[TensorSpec]) -> list[int] | None:
        """Index of the session output for each manifest output: by name, else in order / by unique shape."""
        names = [g.name for g in got]
        if all(w.name in names for w in want):
            return [names.index(w.name) for w in want]
        if [list(w.shape) for w in want] == [list(g.shape) for g in got]:
            return list(range(len(want)))
        order: list[int] = []
        for w in want:
            hits = [i for i, g in enumerate(got) if list(g.shape) == list(w.shape) and i not in order]
            if len(hits) != 1:
                return None
            order.append(hits[0])
        return order

    # ---- inference -------------------------------------------------------------------------------------------

    def _as_list(self, inputs: Any) -> list[Any]:
        if isinstance(inputs, np.ndarray):
            return [inputs]
        if isinstance(inputs, dict):
            extra = [k for k in inputs if k not in self._name_index]
            if extra:
                raise InputError(f"unknown input name(s) {', '.join(map(repr, extra))}: the model takes "
                                 f"{', '.join(map(repr, self.input_names))}")
            missing = [n for n in self.input_names if n not in inputs]
            if missing:
                raise InputError(f"missing input(s) {', '.join(map(repr, missing))}: the model takes "
                                 f"{', '.join(map(repr, self.input_names))}")
            return [inputs[n] for n in self.input_names]
        if isinstance(inputs, (list, tuple)):
            return list(inputs)
        raise InputError(f"inputs must be an array, a list of arrays or a dict name -> array, not "
                         f"{type(inputs).__name__}")

    def _conform(self, k: int, x: Any) -> np.ndarray:
        """Input ``k`` as an array of the model's dtype and shape (in the source layout); InputError otherwise."""
        if not isinstance(x, np.ndarray):
            try:
                x = np.asarray(x)
            except (ValueError, TypeError) as exc:
                raise InputError(f"input {self.input_names[k]!r} is not a rectangular array ({exc})") from None
        want = self._dtypes[k]
        if x.dtype != want:
            kind = x.dtype.kind
            if (want.kind == "f" and kind == "f") or (want.kind in "iu" and kind in "iu"):
                x = x.astype(want)
            else:
                raise InputError(f"input {self.input_names[k]!r} has dtype {x.dtype}, the model expects {want}"
                                 + (": decode and preprocess images with predict_image" if kind == "u" else ""))
        shape = self._shapes[k]
        if x.shape != shape and (self._static[k] or len(x.shape) != len(shape) or
                                 any(w != -1 and w != g for w, g in zip(shape, x.shape, strict=True))):
            raise InputError(f"input {self.input_names[k]!r} has shape {list(x.shape)}, the model expects "
                             f"{list(self.input_specs[k].shape)}")
        return x

    def predict(self, inputs: np.ndarray | list[np.ndarray] | dict[str, np.ndarray]) -> Prediction:
        """Run ready tensors (the source model's layout and dtype: ``input_specs``); InputError if they do not fit."""
        return self._predict(inputs, None)

    def _predict(self, inputs: Any, raw: Any) -> Prediction:
        """:meth:`predict`; ``raw`` is the input as the caller gave it (image bytes or array) for data capture."""
        tel = self._sink
        try:
            xs = self._as_list(inputs)
            if len(xs) != len(self._shapes):
                raise InputError(f"model takes {len(self._shapes)} input(s) ({', '.join(self.input_names)}), "
                                 f"got {len(xs)}")
            xs = [self._conform(k, x) for k, x in enumerate(xs)]
        except InputError:
            if tel is not None:
                tel.record_error("input")
            raise
        if tel is not None:  # before the run, while the input is still in the CPU caches
            tel.observe_input(xs[0])
        feed = [x if p is None else np.ascontiguousarray(x.transpose(p)) for x, p in zip(xs, self._perms, strict=True)]
        with self._lock:
            t0 = time.perf_counter()
            try:
                outs = self.session.run(feed)
            except InputError:  # the runtime's own checks (e.g. NaN / Inf values): a bad input, re-raised
                if tel is not None:
                    tel.record_error("input")
                raise
            except Exception:  # counted, then re-raised unchanged
                if tel is not None:
                    tel.record_error("runtime")
                raise
            latency = (time.perf_counter() - t0) * 1000.0
        if self._out_order is not None:
            outs = [outs[i] for i in self._out_order]
        pred = Prediction(dict(zip(self.output_names, outs, strict=True)), latency, self.model_version,
                          partial(self._top_k, outs[0]) if self._classifier else None)
        if self._classifier:
            self._observe_class(pred, outs[0], tel)
        elif tel is not None:
            tel.record(latency)
        cap = self._capture
        if cap is not None:
            try:
                cap.offer(self, pred, raw, xs[0])
            except Exception:  # capture must never fail an inference
                log.exception("data capture failed for prediction %s", pred.id)
        return pred

    def _observe_class(self, pred: Prediction, out: np.ndarray, tel: WindowAggregator | None) -> None:
        """Keep the prediction's scores for feedback and telemetry; classes and confidences are worked out in bulk
        later (right after a model run every numpy call is slow: the run has flushed the caches)."""
        if out.shape[0] != 1 or out.size < 2:  # a batch: no single class to remember
            if tel is not None:
                tel.record(pred.latency_ms)
            return
        scores = out.reshape(-1)
        if self.remember:
            with self._recent_lock:
                self._unresolved.append((pred.id, scores))
                if len(self._unresolved) >= 64:
                    self._resolve_ids()
        if tel is not None:
            tel.record(pred.latency_ms, scores=scores)

    def _resolve_ids(self) -> None:
        """Move pending (id, scores) into the id -> class memory (caller holds ``_recent_lock``)."""
        items, self._unresolved = self._unresolved, []
        try:
            best = np.stack([s for _, s in items]).argmax(axis=1).tolist()
        except ValueError:  # rows of different sizes (dynamic output shape)
            best = [int(s.argmax()) for _, s in items]
        recent = self._recent
        for (pid, _), cls in zip(items, best, strict=True):
            recent[pid] = cls
        while len(recent) > self.remember:
            recent.popitem(last=False)

    def _top_k(self, out: np.ndarray) -> list[dict[str, Any]]:
        """The ``top_k`` best classes of one classifier output (called lazily by :class:`Prediction`); equal scores
        (frequent with int8 models' dequantized outputs) are ranked by class index, lowest first."""
        scores = out.reshape(-1)
        n = scores.size
        if n < 2 or out.shape[0] != 1:
            return []
        if self._probabilities is None:  # decided once: does the model already end in a softmax?
            self._probabilities = is_probabilities(scores)
        return top_k_classes(scores, min(self.top_k, n), self._probabilities, self.labels)

    def predict_image(self, data: bytes | bytearray | memoryview | np.ndarray) -> Prediction:
        """Decode (JPEG/PNG bytes) or take a BGR uint8 array, apply the manifest preprocessing, and predict."""
        stage = "input"
        try:
            if self.preprocessing is None:
                raise InputError(f"bundle {self.model_version} records no image preprocessing: send ready tensors "
                                 "(predict / {\"inputs\": ...}) or rebuild the bundle with --preprocessing")
            if len(self.input_specs) != 1:
                raise InputError(f"the model takes {len(self.input_specs)} inputs: images work only for one-input "
                                 "models")
            if isinstance(data, np.ndarray):
                img = data
                if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)) \
                        or min(img.shape[:2]) < 1:
                    raise InputError(f"image array must be uint8 HxW or HxWx3 (BGR), got {img.dtype} "
                                     f"{list(img.shape)}")
                stage = "preprocess"
                x = self.preprocessing.apply(img)
            elif isinstance(data, (bytes, bytearray, memoryview)):
                # size checked from the header, JPEG drafted / others reduced while decoding: a decompression bomb
                # is refused before it costs memory (edge_sdk.preprocessing.Preprocessing.pixel_cap)
                stage = "preprocess"
                x = self.preprocessing.apply_encoded(data)
            else:
                raise InputError(f"an image must be encoded bytes or a decoded array, not {type(data).__name__}")
        except InputError:
            self._sink.record_error(stage)
            raise
        return self._predict(x, data)

    # ---- telemetry and feedback ---------------------------------------------------------------------------

    def set_telemetry(self, aggregator: WindowAggregator | None) -> None:
        """Feed every following call's latency, class, confidence, input and errors to ``aggregator`` (None: stop)."""
        self._telemetry = aggregator
        self._sink = TelemetryTee(self.stats, aggregator) if aggregator is not None else self.stats

    def set_capture(self, capture: Capture | None) -> None:
        """Offer every following prediction (and feedback) to ``capture`` (edge_sdk/device_agent/capture.py)."""
        self._capture = capture

    @property
    def telemetry(self) -> WindowAggregator | None:
        """The aggregator fed by this agent, or None."""
        return self._telemetry

    def class_of_label(self, label: int | str) -> int:
        """The class index of ``label``: a class index, or one of the bundle's label names; InputError otherwise."""
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise InputError(f"a label must be a class index or a label name, not {type(label).__name__}")
        if isinstance(label, str):
            if label in self._label_index:
                return self._label_index[label]
            hint = f"one of the bundle's {len(self._label_index)} labels" if self._label_index else \
                "an integer class index (this bundle has no label names)"
            raise InputError(f"unknown label {label[:80]!r}: send {hint}")
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            top = f"0..{self.num_classes - 1}" if self.num_classes is not None else ">= 0"
            raise InputError(f"class index {label} is out of range: use {top}")
        return int(label)

    def feedback(self, prediction_id: str, label: int | str) -> bool | None:
        """Ground truth for an earlier prediction: True / False (was it right), or None when ``prediction_id`` is
        not one of the last ``remember`` predictions (or was already labelled). Counted in telemetry."""
        if not self._classifier:
            raise InputError(f"{self.model_version} is not a classifier (task {self.bundle.manifest.task}): "
                             "feedback takes class labels")
        index = self.class_of_label(label)
        with self._recent_lock:
            if self._unresolved:
                self._resolve_ids()
            predicted = self._recent.pop(prediction_id, None) if isinstance(prediction_id, str) else None
        tel = self._sink
        if predicted is None:
            if tel is not None:
                tel.record_unknown_feedback()
            return None
        correct = predicted == index
        if tel is not None:
            tel.record_feedback(correct)
        cap = self._capture
        if cap is not None:
            try:
                cap.on_feedback(prediction_id, index, predicted)
            except Exception:  # capture must never fail a feedback
                log.exception("data capture failed for feedback on %s", prediction_id)
        return correct

    def describe(self) -> dict[str, Any]:
        """What is running and why (for /healthz, logs and `edge-sdk agent` output)."""
        return {"model_version": self.model_version, "artifact": self.artifact.key, "runtime": self.runtime_name,
                "runtime_version": self.runtime_version, "reason": self.selection_reason, "task": self.task,
                "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in self.input_specs],
                "outputs": list(self.output_names), "preprocessing": self.preprocessing is not None}

    def close(self) -> None:
        """Release the runtime session."""
        self.session.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Agent({self.model_version}, {self.artifact.key} on {self.runtime_name})"
