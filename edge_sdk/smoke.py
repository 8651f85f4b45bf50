"""The bundle's smoke test: one real input and the source model's output for it, checked on the device.

The converters store, in every bundle they write::

    smoke/input_<i>.npy              one sample per model input (the source model's layout and dtype)
    smoke/reference_output_<k>.npy   the source model's output ``k`` for that sample

and in ``manifest.extra["smoke_test"]``::

    {"inputs": [...paths], "reference_outputs": [...paths], "origin": "where the sample came from",
     "tolerances": {"fp32": {"min_cosine": 0.9999, "atol": 0.0042}, "int8": {"min_cosine": 0.95, "atol": null}, ...}}

The smoke files are also listed (with their sha256) among every artifact's side ``files``, so
``Bundle.verify`` and the bundle signature cover them. :func:`edge_sdk.device_agent.smoke.run_smoke_test` loads the
bundle with the device Agent (the artifact and runtime this device would really use),
runs the sample and compares with the reference using the limits of the artifact's precision — the same
limits ``converters/validate.py`` applied at build time (cosine, and max abs error = max relative error x the
largest reference value over the validation set). Numpy only; no converter or framework is imported.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.bundle import Bundle, sha256_file
from edge_sdk.errors import BundleError

__all__ = [
    "FALLBACK_MIN_COSINE", "SMOKE_DIR", "compare_smoke", "load_smoke_sample", "smoke_limits", "write_smoke_sample",
]

SMOKE_DIR = "smoke"
# used only when a manifest's smoke_test has no limits for a precision (mirrors converters/validate.py)
FALLBACK_MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}
FALLBACK_MIN_COSINE_OTHER = 0.95


def write_smoke_sample(bundle_dir: str | os.PathLike, inputs: Sequence[np.ndarray],
                       reference_outputs: Sequence[np.ndarray], tolerances: Mapping[str, Mapping[str, float | None]],
                       *, output_scale: float, origin: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write one sample and its reference outputs under ``bundle_dir/smoke/``.

    ``inputs`` / ``reference_outputs`` hold one sample each (batch dimension 1). ``tolerances`` maps a precision
    to ``{"min_cosine", "max_rel_error"}``; ``output_scale`` is the largest |reference| over the whole validation
    set (what validation divides the error by). Returns ``(manifest_extra_smoke_test, side_file_entries)``;
    the caller adds the entries to every artifact's ``files``.
    """
    root = Path(bundle_dir)
    (root / SMOKE_DIR).mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, Any]] = []
    paths: dict[str, list[str]] = {"inputs": [], "reference_outputs": []}
    for kind, arrays, stem in (("inputs", inputs, "input"), ("reference_outputs", reference_outputs,
                                                             "reference_output")):
        for k, arr in enumerate(arrays):
            rel = f"{SMOKE_DIR}/{stem}_{k}.npy"
            np.save(root / rel, np.ascontiguousarray(arr), allow_pickle=False)
            paths[kind].append(rel)
            entries.append({"path": rel, "sha256": sha256_file(root / rel), "size_bytes": (root / rel).stat().st_size})
    limits = {}
    for precision, tol in tolerances.items():
        rel_err = tol.get("max_rel_error")
        limits[str(precision)] = {"min_cosine": tol.get("min_cosine"),
                                  "atol": None if rel_err is None else float(rel_err) * float(output_scale or 1.0)}
    extra = {**paths, "origin": origin, "tolerances": limits}
    return extra, entries


def load_smoke_sample(bundle: Bundle) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The smoke inputs and reference outputs of ``bundle``, each file checked against its listed sha256.

    Raises BundleError when the bundle has no smoke sample or a file is missing, unlisted or altered.
    """
    spec = bundle.manifest.extra.get("smoke_test")
    if not isinstance(spec, dict) or not spec.get("inputs") or not spec.get("reference_outputs"):
        raise BundleError(f"bundle {bundle.manifest.name}:{bundle.manifest.version} has no smoke-test sample: "
                          "rebuild it with `edge-sdk convert` (bundles record one since edge-sdk 0.2)")
    listed = {f.get("path"): f.get("sha256") for a in bundle.artifacts for f in a.files}
    arrays: dict[str, list[np.ndarray]] = {"inputs": [], "reference_outputs": []}
    for kind in arrays:
        for rel in spec[kind]:
            path = bundle.root / str(rel)
            rel_path = Path(str(rel))
            if rel_path.is_absolute() or ".." in rel_path.parts:
                raise BundleError(f"smoke-test file {rel!r} points outside the bundle: the manifest is malformed")
            if rel not in listed:
                raise BundleError(f"smoke-test file {rel} is not listed with a sha256 in the manifest: rebuild the "
                                  "bundle")
            if not path.is_file():
                raise BundleError(f"smoke-test file {rel} is missing from {bundle.root}: re-fetch the bundle")
            if listed[rel] and sha256_file(path) != listed[rel]:
                raise BundleError(f"smoke-test file {rel} does not match its sha256: re-fetch the bundle")
            try:
                arrays[kind].append(np.load(path, allow_pickle=False))
            except (ValueError, OSError) as exc:
                raise BundleError(f"smoke-test file {rel} is not a readable .npy ({exc}): rebuild the bundle") from None
    return arrays["inputs"], arrays["reference_outputs"]


def smoke_limits(bundle: Bundle, precision: str) -> tuple[float, float | None]:
    """The (min cosine, max abs error) a smoke test of ``precision`` must meet: the manifest's, else defaults."""
    tols = (bundle.manifest.extra.get("smoke_test") or {}).get("tolerances") or {}
    tol = tols.get(precision) or {}
    fallback = FALLBACK_MIN_COSINE.get(precision, FALLBACK_MIN_COSINE_OTHER)
    min_cos = tol.get("min_cosine")
    atol = tol.get("atol")
    return (fallback if min_cos is None else float(min_cos)), (None if atol is None else float(atol))


def compare_smoke(reference: Sequence[np.ndarray], got: Sequence[np.ndarray], *, min_cosine: float,
                  atol: float | None) -> tuple[float | None, float | None, list[str]]:
    """Cosine and max abs error of ``got`` against ``reference`` (all outputs together) and every failed check."""
    if len(reference) != len(got):
        return None, None, [f"the model gave {len(got)} outputs, the reference has {len(reference)}"]
    for r, g in zip(reference, got, strict=True):
        if np.asarray(r).size != np.asarray(g).size:
            return None, None, [f"output shape {list(np.shape(g))} differs from the reference's {list(np.shape(r))}"]
    r_all = np.concatenate([np.asarray(r, np.float64).ravel() for r in reference])
    g_all = np.concatenate([np.asarray(g, np.float64).ravel() for g in got])
    if not np.isfinite(g_all).all():
        return None, None, ["the model produced NaN or Inf"]
    max_abs = float(np.abs(r_all - g_all).max()) if r_all.size else 0.0
    denom = float(np.linalg.norm(r_all) * np.linalg.norm(g_all))
    cosine = float(r_all @ g_all / denom) if denom > 0 else (1.0 if not r_all.any() and not g_all.any() else 0.0)
    failures = []
    if cosine < min_cosine:
        failures.append(f"cosine {cosine:.6g} < {min_cosine:g}")
    if atol is not None and max_abs > atol:
        failures.append(f"max abs error {max_abs:.4g} > {atol:.4g}")
    return cosine, max_abs, failures
