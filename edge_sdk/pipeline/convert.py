"""Step *convert*: the new model -> a validated bundle, built exactly as the current version was.

The current version's manifest records the options of the ``convert`` call that built it (``extra.conversion``:
targets, precisions or explicit variants, input shape and dtypes, dynamic axes, routes, model class, task,
preprocessing, converter options, tolerances, accuracy budget) and, for ``edge-sdk build``, the target profile
(``extra.build``). They are replayed here for the new model, with the current version's labels, fleets and the
next ``version_code``. Calibration data (int8) is the gathered training data (``[convert] calibration``, or a
``.npy`` path). Validation uses up to ``[convert] val_samples`` labelled inputs, and the converter records the
drift baseline of the new version (input and confidence histograms) from them, the reference that devices and the
collector compare live inputs with. With ``[convert] baseline = "samples"`` (default) they are the labelled device
samples (training rows and drifted holdout): the data the fleet sees now, so a version trained because the inputs
drifted does not keep reporting the same drift; with ``"holdouts"`` (or fewer than 50 samples) the drifted holdout
and the original test set.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.pipeline.context import StepContext, file_ref, on_path
from edge_sdk.pipeline.errors import PipelineError

__all__ = ["next_version", "replay_kwargs", "run"]


_MIN_BASELINE_SAMPLES = 50  # fewer device samples: validate on the holdouts (a baseline of a handful is noise)


def next_version(ctx: StepContext) -> str:
    """``[model] version``, or for "auto" the next whole number after the registered ones (else a dated suffix)."""
    cfg = ctx.config
    if cfg.model.version != "auto":
        return cfg.model.version
    versions = [r.version for r in ctx.registry.list(cfg.model.name)]
    if versions and all(re.fullmatch(r"\d{1,9}", v) for v in versions):
        return str(max(int(v) for v in versions) + 1)
    return f"{ctx.current().version}.r{datetime.now(UTC).strftime('%Y%m%d%H%M%S')}"


def replay_kwargs(manifest: dict[str, Any]) -> dict[str, Any]:
    """``convert`` keyword arguments from a manifest's ``extra.conversion`` (PipelineError when it has none)."""
    from edge_sdk.converters.accuracy_budget import AccuracyBudget
    from edge_sdk.converters.base import ConvertOptions
    from edge_sdk.converters.validate import Tolerance
    from edge_sdk.formats import Precision
    from edge_sdk.preprocessing import Preprocessing

    conv = (manifest.get("extra") or {}).get("conversion")
    if not isinstance(conv, dict):
        raise PipelineError(f"{manifest.get('name')}:{manifest.get('version')} has no recorded conversion options "
                            "(manifest extra.conversion, written by edge-sdk convert since issue 18): rebuild it with "
                            "the current edge-sdk so the pipeline can replay its conversion")
    kw: dict[str, Any] = {
        "to": conv.get("to") or "onnx", "precision": conv.get("precision"),
        "variants": [tuple(v) for v in conv["variants"]] if conv.get("variants") else None,
        "ort": bool(conv.get("ort", True)), "skip_unsupported": bool(conv.get("skip_unsupported", False)),
        "keep_failed": bool(conv.get("keep_failed", False)), "input_shape": conv.get("input_shape"),
        "input_dtypes": conv.get("input_dtypes"), "dynamic": conv.get("dynamic") or (),
        "custom_objects": conv.get("custom_objects"), "route": conv.get("route"),
        "model_class": conv.get("model_class"), "framework": conv.get("framework"), "task": conv.get("task"),
        "preprocessing": Preprocessing.from_dict(conv.get("preprocessing")),
        "options": ConvertOptions(**conv["options"]) if conv.get("options") else None,
        "tolerances": {Precision.parse(k): Tolerance(**v) for k, v in conv["tolerances"].items()}
        if conv.get("tolerances") else None,
        "budget": AccuracyBudget(**conv["budget"]) if conv.get("budget") else None,
        "labels": manifest.get("labels"),
    }
    return kw


def _write(path: Path, arr: np.ndarray) -> Path:
    np.save(path, arr)
    return path


def run(ctx: StepContext) -> dict[str, Any]:
    """Run the convert step (module doc); return its record."""
    started, t0 = time.time(), time.perf_counter()
    cfg = ctx.config
    trained = ctx.record("train")
    gathered = ctx.record("gather")
    current = ctx.current()
    manifest = current.manifest
    kw = replay_kwargs(manifest)
    model = trained["outputs"]["model"]
    if model.get("model_class"):
        kw["model_class"] = model["model_class"]
    out_dir = ctx.dir("convert")
    rng = np.random.default_rng(0)
    with np.load(gathered["outputs"]["data"]["path"], allow_pickle=False) as npz:
        train_x = npz["train_inputs"]
        n = min(cfg.convert.calib_samples, len(train_x))
        calib_rows = train_x[np.sort(rng.choice(len(train_x), n, replace=False))] if n else train_x[:0]
        is_sample = npz["train_is_sample"]
        sx = np.concatenate([train_x[is_sample], npz["drift_inputs"]])
        sy = np.concatenate([npz["train_labels"][is_sample], npz["drift_labels"]])
        if cfg.convert.baseline == "samples" and len(sx) >= _MIN_BASELINE_SAMPLES:
            vx, vy, val_from = sx, sy, f"device samples ({len(sx)})"
        else:
            vx = np.concatenate([npz["drift_inputs"], npz["test_inputs"]])
            vy = np.concatenate([npz["drift_labels"], npz["test_labels"]])
            val_from = f"drifted holdout + original test set ({len(vx)})"
    pick = np.sort(rng.choice(len(vx), min(cfg.convert.val_samples, len(vx)), replace=False))
    val_path, val_labels_path = _write(out_dir / "val.npy", vx[pick]), _write(out_dir / "val_labels.npy", vy[pick])
    calib: Any = None
    if (manifest.get("extra") or {}).get("conversion", {}).get("calibration") is not None:
        calib = (_write(out_dir / "calib.npy", calib_rows) if cfg.convert.calibration == "gathered"
                 else cfg.convert.calibration)
    version = next_version(ctx)
    code = manifest.get("version_code")
    bundle_dir = out_dir / "bundle"
    build_info = (manifest.get("extra") or {}).get("build") or {}
    common = {"out": bundle_dir, "calib": calib, "val": val_path, "val_labels": val_labels_path,
              "name": cfg.model.name, "version": version, "overwrite": True, "quiet": True,
              "version_code": code + 1 if isinstance(code, int) else None, "fleets": manifest.get("fleets")}
    from edge_sdk.errors import ValidationError

    with on_path(cfg.train.path):  # the model class lives beside the training code
        try:
            if build_info.get("target"):
                from edge_sdk.converters.build import build

                budget = kw.pop("budget", None)
                for k in ("variants", "to", "precision", "ort", "skip_unsupported"):
                    kw.pop(k, None)
                bundle = build(model["path"], target=build_info["target"],
                               max_accuracy_drop=budget.max_drop_pp if budget else None,
                               min_agreement=budget.min_agreement if budget else None,
                               min_cosine=budget.min_cosine if budget else None, **kw, **common)
            else:
                from edge_sdk.converters.pipeline import convert

                bundle = convert(model["path"], **kw, **common)
        except ValidationError as exc:
            raise PipelineError(f"conversion of {cfg.model.name}:{version} failed validation: {exc}") from None
    arts = {a.key: {"passed": a.validation.passed, "accuracy": a.validation.accuracy,
                    "source_accuracy": a.validation.source_accuracy, "sha256": a.sha256}
            for a in bundle.artifacts}
    return ctx.write_record("convert", started, t0=t0,
                            inputs={"model": {k: model[k] for k in ("path", "sha256")},
                                    "replayed_from": current.ref, "calibration": str(calib) if calib else None,
                                    "validation": file_ref(val_path), "validation_from": val_from,
                                    "build_target": build_info.get("target")},
                            outputs={"bundle": file_ref(bundle_dir), "name": cfg.model.name, "version": version},
                            figures={"artifacts": arts, "version_code": common["version_code"]})
