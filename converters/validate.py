"""Numeric validation: run every artifact in its own runtime and compare it with the source model.

Every artifact is measured on the same held-out inputs; every check that is over tolerance is
collected, so one table (and one error) shows all that went wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edge_sdk.bundle import TensorSpec, Validation
from edge_sdk.calibration import SampleSet
from edge_sdk.errors import EdgeSDKError, InferenceError, first_line
from edge_sdk.formats import Format, Precision
from edge_sdk.runtimes import runtime_for

__all__ = ["DEFAULT_TOLERANCES", "Tolerance", "compare_outputs", "reference_outputs", "run_artifact",
           "validate_artifact"]

#: share of an integer output's values (token ids passed through, labels, counts) that must equal the source's
MIN_INTEGER_EQUAL = 0.9


@dataclass(frozen=True)
class Tolerance:
    """Limits an artifact must stay within. ``None`` disables a check.

    ``max_rel_error`` is max |artifact - source| divided by max |source| over all validation outputs.
    Classifier checks (top-1 where the source is confident, source top-1 inside artifact top-5) apply
    when the model is a classifier.
    """

    min_cosine: float | None = 0.99
    max_rel_error: float | None = None
    min_top1_agreement_confident: float | None = None
    min_top5_containment: float | None = None
    min_top1_agreement: float | None = None


DEFAULT_TOLERANCES: dict[Precision, Tolerance] = {
    Precision.FP32: Tolerance(min_cosine=0.9999, max_rel_error=1e-3, min_top1_agreement=0.99),
    Precision.FP16: Tolerance(min_cosine=0.999, max_rel_error=2e-2, min_top1_agreement=0.97),
    Precision.DYNAMIC: Tolerance(min_cosine=0.95, min_top1_agreement_confident=0.95, min_top5_containment=0.95),
    Precision.INT8: Tolerance(min_cosine=0.95, min_top1_agreement_confident=0.95, min_top5_containment=0.95),
    Precision.PALETTIZED: Tolerance(min_cosine=0.95, min_top1_agreement_confident=0.95, min_top5_containment=0.95),
}


def _softmax(x: np.ndarray) -> np.ndarray:
    if x.min() >= 0 and np.allclose(x.sum(axis=-1), 1.0, atol=1e-3):
        return x  # already probabilities
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_outputs(predict, samples: SampleSet) -> list[np.ndarray]:
    """Run ``predict`` on every sample; return one stacked (N, ...) array per output."""
    per_sample = [predict(s) for s in samples]
    return [np.concatenate([np.asarray(o[k]) for o in per_sample]) for k in range(len(per_sample[0]))]


def run_artifact(path: Path, fmt: Format, samples: SampleSet, *, transpose: tuple[int, ...] | None = None,
                 runtime_options: dict | None = None) -> tuple[list[np.ndarray], list[TensorSpec], list[TensorSpec]]:
    """Run an artifact on every sample in its runtime; returns stacked outputs and the I/O specs."""
    rt = runtime_for(fmt)
    if rt is None:
        raise InferenceError(f"no runtime for {fmt.value} is installed on this host")
    session = rt.load(path, **(runtime_options or {}))
    try:
        outs = []
        for s in samples:
            xs = [np.ascontiguousarray(x.transpose(transpose)) if transpose and x.ndim == len(transpose) else x
                  for x in s]
            outs.append(session.run(xs))
        tensors = [k for k in range(len(outs[0])) if isinstance(outs[0][k], np.ndarray)]  # not ZipMap dicts
        stacked = [np.concatenate([np.asarray(o[k], np.float32) for o in outs]) for k in tensors]
        return stacked, list(session.inputs), [session.outputs[k] for k in tensors]
    finally:
        session.close()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    d = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / d) if d > 0 else 0.0


def _match_outputs(ref: list[np.ndarray], got: list[np.ndarray]) -> tuple[list[np.ndarray], list[int] | None]:
    """Order ``got`` like ``ref`` (converters may reorder outputs, e.g. TFLite sorts signature outputs): by shape,
    and among outputs of the same shape by closeness to the source's. Returns the reordered list and the
    permutation (artifact output index for each source output) when it is not the identity."""
    if len(ref) != len(got) or len(ref) == 1:
        return got, None
    order: list[int] = []
    for r in ref:
        free = [i for i, g in enumerate(got) if i not in order and g.shape == r.shape]
        if not free:
            return got, None
        order.append(max(free, key=lambda i: _cos(r, got[i])) if len(free) > 1 else free[0])
    if order == list(range(len(got))):
        return got, None
    return [got[i] for i in order], order


def _class_rows(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first output as one row of class scores per decision, for source and artifact (float64).

    ``[N, C]`` is one decision per sample. ``[N, T, C]`` (a CTC recogniser, a per-token tagger) is one decision per
    position, classes on the last axis: its top-1 agreement is per position, as a sequence model is judged, not an
    argmax over all ``T * C`` scores of a sample. Other ranks are scored as one flat vector per sample.
    """
    if ref.ndim == 3 and ref.shape[-1] > 1:
        rows = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    else:
        rows = ref.reshape(ref.shape[0], -1).astype(np.float64)
    return rows, got.reshape(rows.shape).astype(np.float64)


def compare_outputs(ref: list[np.ndarray], got: list[np.ndarray], *, classifier: bool,
                    labels: np.ndarray | None = None) -> Validation:
    """Metrics of ``got`` against the reference ``ref`` (both stacked per output)."""
    v = Validation(samples=int(ref[0].shape[0]))
    got, order = _match_outputs(ref, got)
    if order is not None:
        v.checks["output_order"] = order  # artifact output index of each source output
    if len(ref) != len(got):
        v.failures.append(f"artifact has {len(got)} outputs, source has {len(ref)}")
        return v
    for r, g in zip(ref, got, strict=True):
        if r.size != g.size:
            v.failures.append(f"output shape {list(g.shape)} differs from the source's {list(r.shape)}")
            return v
    pairs = list(zip(ref, got, strict=True))
    integer = [np.asarray(r).dtype.kind in "iub" for r in ref]
    if any(integer) and not all(integer):  # integer outputs (ids passed through, labels, counts) stay out of the
        for i, (r, g) in enumerate(pairs):  # cosine, where their magnitude would drown the float outputs
            if integer[i]:
                same = float((np.asarray(r).ravel() == np.asarray(g).ravel().astype(r.dtype)).mean())
                v.checks[f"output_{i}_integer_equal"] = same
                if same < MIN_INTEGER_EQUAL:  # a computed label may flip where fp32 was unsure; most must not
                    v.failures.append(f"integer output {i} equals the source's on {100 * same:.1f}% of values "
                                      f"(limit >= {100 * MIN_INTEGER_EQUAL:g}%)")
        pairs = [p for p, is_int in zip(pairs, integer, strict=True) if not is_int]
    r_all = np.concatenate([r.astype(np.float64).ravel() for r, _ in pairs])
    g_all = np.concatenate([g.astype(np.float64).reshape(r.shape).ravel() for r, g in pairs])
    if not np.isfinite(g_all).all():
        v.failures.append("artifact produced NaN or Inf")
        return v
    v.max_abs_error = float(np.abs(r_all - g_all).max())
    denom = float(np.linalg.norm(r_all) * np.linalg.norm(g_all))
    v.cosine = float(r_all @ g_all / denom) if denom > 0 else (1.0 if not r_all.any() and not g_all.any() else 0.0)
    scale = float(np.abs(r_all).max()) or 1.0
    v.checks["max_rel_error"] = v.max_abs_error / scale
    if classifier:
        r0, g0 = _class_rows(ref[0], got[0])
        top_r, top_g = r0.argmax(1), g0.argmax(1)
        v.top1_agreement = float((top_r == top_g).mean())
        conf = _softmax(r0).max(1) >= 0.5
        v.checks["confident_samples"] = int(conf.sum())
        if conf.any():
            v.top1_agreement_confident = float((top_r[conf] == top_g[conf]).mean())
        k = min(5, r0.shape[1])
        top5 = np.argsort(-g0, axis=1)[:, :k]
        v.top5_containment = float((top5 == top_r[:, None]).any(1).mean())
        if labels is not None:
            lab = np.asarray(labels).reshape(-1)[: len(top_g)]
            if len(lab) != len(top_g):  # per-sample labels cannot score per-position classes
                return v
            v.accuracy = float((top_g == lab).mean())
            v.source_accuracy = float((top_r == lab).mean())
    return v


def apply_tolerance(v: Validation, tol: Tolerance) -> Validation:
    """Fill ``passed`` and ``failures`` from the tolerance; every failing check is listed."""
    v = replace(v, failures=list(v.failures), checks=dict(v.checks))
    checks = [
        ("cosine", v.cosine, tol.min_cosine, ">="),
        ("max_rel_error", v.checks.get("max_rel_error"), tol.max_rel_error, "<="),
        ("top1_agreement", v.top1_agreement, tol.min_top1_agreement, ">="),
        ("top1_agreement_confident", v.top1_agreement_confident, tol.min_top1_agreement_confident, ">="),
        ("top5_containment", v.top5_containment, tol.min_top5_containment, ">="),
    ]
    for name, value, limit, op in checks:
        if value is None or limit is None:
            continue
        ok = value >= limit if op == ">=" else value <= limit
        if not ok:
            v.failures.append(f"{name} {value:.4g} (limit {op} {limit:g})")
    v.checks["tolerance"] = {k: val for k, val in tol.__dict__.items() if val is not None}
    v.passed = not v.failures
    return v


def validate_artifact(path: Path, fmt: Format, precision: Precision, samples: SampleSet,
                      reference: Sequence[np.ndarray], *, classifier: bool, tolerance: Tolerance,
                      labels: np.ndarray | None = None, transpose: tuple[int, ...] | None = None,
                      runtime_options: dict | None = None) -> tuple[Validation, list[TensorSpec], list[TensorSpec]]:
    """Run one artifact and judge it; runtime failures become a failed Validation, not an exception."""
    try:
        got, ins, outs = run_artifact(path, fmt, samples, transpose=transpose, runtime_options=runtime_options)
    except EdgeSDKError as exc:
        return Validation(passed=False, samples=len(samples), failures=[f"could not run: {exc}"]), [], []
    except Exception as exc:  # a runtime rejecting a broken artifact raises its own types: the artifact failed
        first = first_line(exc, 240)
        return Validation(passed=False, samples=len(samples),
                          failures=[f"could not run in {fmt.value}'s runtime ({type(exc).__name__}: {first})"]), [], []
    v = compare_outputs(list(reference), got, classifier=classifier, labels=labels)
    return apply_tolerance(v, tolerance), ins, outs
