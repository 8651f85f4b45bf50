"""``convert``: source model -> every requested artifact -> validated -> one bundle.

The bundle is assembled in a temporary directory and moved into place only when complete. An
artifact that fails validation is left out (unless ``keep_failed``), the others still ship, and a
:class:`ValidationError` listing every failure is raised after the bundle is written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.baseline import compute_baseline
from edge_sdk.bundle import Artifact, Bundle, Manifest, TensorSpec, atomic_bundle_dir
from edge_sdk.calibration import CalibrationSource, SampleSet, load_samples
from edge_sdk.converters.accuracy_budget import AccuracyBudget, BudgetLadder
from edge_sdk.converters.attempts import ArtifactResult, Judge, place, produce_artifact
from edge_sdk.converters.base import ConversionContext, ConvertOptions, check_options, needs_calibration
from edge_sdk.converters.model_card import card_of, with_card
from edge_sdk.converters.registry import BUILTIN_CONVERTERS, load_builtin_converters, registered
from edge_sdk.converters.routes import (
    all_route_converters,
    candidate_routes,
    converter_of,
    parse_forced_routes,
    routes_with_precision,
)
from edge_sdk.converters.sources import InputDtypes, ShapeSpec, load_source
from edge_sdk.converters.tflite_metadata import annotate_tflite
from edge_sdk.converters.validate import DEFAULT_TOLERANCES, Tolerance, reference_outputs
from edge_sdk.errors import CalibrationError, EdgeSDKError, UnsupportedConversionError, ValidationError
from edge_sdk.formats import Format, Precision, Task, parse_list
from edge_sdk.preprocessing import Preprocessing
from edge_sdk.progress import Reporter
from edge_sdk.schema import validate_manifest
from edge_sdk.smoke import write_smoke_sample
from edge_sdk.topics import validate_id

# BUILTIN_CONVERTERS and load_builtin_converters live in converters/registry.py (importing edge_sdk.converters
# already ran it); they are re-exported here for callers of the old names.
__all__ = ["BUILTIN_CONVERTERS", "ArtifactResult", "conversion_record", "convert", "load_builtin_converters"]


def _as_list(value: str | Iterable[Any], enum: type) -> list:
    if isinstance(value, str):
        return parse_list(value, enum)
    return parse_list(",".join(str(v) for v in value), enum)


def _split(calib: SampleSet | None, val: SampleSet | None, rng_shape: list[list[int]],
           dtypes: list[str] | None = None) -> tuple[
        SampleSet | None, SampleSet, str]:
    """Choose calibration and held-out validation samples; say where validation data came from."""
    if val is not None:
        return calib, val, "--val data"
    if calib is not None and len(calib) >= 40:
        k = max(20, len(calib) // 4)
        first, rest = calib.split(len(calib) - k)
        return first, rest, f"{k} samples held out from the calibration data"
    if calib is not None:
        return calib, calib, "the calibration data itself (pass --val for held-out inputs)"
    rng = np.random.default_rng(0)
    dtypes = dtypes or ["float32"] * len(rng_shape)
    b = max(1, rng_shape[0][0]) if rng_shape and rng_shape[0] else 1
    arrays = [rng.standard_normal((16 * b, *s[1:])).astype(np.float32) if dt.startswith("float")
              else np.zeros((16 * b, *s[1:]), dt) for s, dt in zip(rng_shape, dtypes, strict=True)]
    return None, SampleSet(arrays, None, "random", b), "16 random normal inputs (pass --val for real inputs)"


def convert(
    source: Any,
    *,
    out: str | Path,
    to: str | Sequence[str | Format] = "onnx",
    precision: str | Sequence[str | Precision] | None = "fp32",
    calib: CalibrationSource | None = None,
    val: CalibrationSource | None = None,
    val_labels: str | Path | np.ndarray | None = None,
    labels: str | Path | Sequence[str] | None = None,
    input_shape: ShapeSpec | None = None,
    input_dtypes: InputDtypes | None = None,
    dynamic: str | Sequence[str] = (),
    custom_objects: Sequence[str] | None = None,
    route: str | Sequence[str] | dict[str, str] | None = None,
    model_class: str | None = None,
    framework: str | None = None,
    name: str | None = None,
    version: str = "1",
    task: str | Task | None = None,
    preprocessing: Preprocessing | None = None,
    options: ConvertOptions | None = None,
    tolerances: dict[Precision, Tolerance] | None = None,
    ort: bool = True,
    variants: Sequence[tuple[str | Format, str | Precision]] | None = None,
    skip_unsupported: bool = False,
    keep_failed: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    budget: AccuracyBudget | None = None,
    version_code: int | None = None,
    fleets: Sequence[str] | None = None,
) -> Bundle:
    """Convert ``source`` to each target x precision, validate each artifact, write a bundle to ``out``.

    ``input_shape`` is one shape or ``{input name: shape}``; it pins symbolic axes of ONNX / SavedModel / Keras
    sources before any static-shape tool runs. ``dynamic`` (e.g. ``"batch,height,width"``) keeps those axes
    symbolic in the ONNX and OpenVINO artifacts of an ONNX or PyTorch source. ``input_dtypes`` gives integer inputs
    (``{"input_ids": "int64"}``); ``custom_objects`` the ``module:name`` of custom Keras layers. ``route``
    forces one route (``"onnx2tf"`` or ``{"tflite": "onnx2tf"}``; see converters/routes.py); otherwise the routes
    of each target are tried in order until one gives a passing artifact. ``precision=None`` means fp32, or for an
    existing .tflite / OpenVINO IR source, the precision the file already has.

    ``variants`` (explicit (format, precision) pairs) replaces the ``to`` x ``precision`` product;
    ``skip_unsupported`` records variants this source cannot produce instead of refusing the request.
    ``budget`` (an :class:`AccuracyBudget`) judges every int8 artifact and, when one is over it, runs the
    fallback ladder of converters/accuracy_budget.py (better calibration, layers kept in float, 16-bit
    activations, fp16); an artifact still over budget is reported as failed.

    ``version_code`` (a whole number, higher = newer) and ``fleets`` (the fleets the bundle may run in) are the
    signed model identity: written into the manifest here so that ``edge-sdk bundle sign`` covers them; devices
    refuse a lower version_code of the same model and a bundle listing other fleets. Both default to absent.

    Returns the :class:`Bundle`. Raises :class:`ValidationError` (with ``.bundle`` and ``.results``)
    after writing the bundle when any artifact failed; raises before writing anything for bad input
    (unknown target/precision, unreadable source, missing calibration data, wrong shapes).
    """
    identity = _identity(version_code, fleets)  # refused before the (possibly slow) model load
    conversion = conversion_record(to=to, precision=precision, variants=variants, ort=ort,
                                   skip_unsupported=skip_unsupported, keep_failed=keep_failed,
                                   input_shape=input_shape, input_dtypes=input_dtypes, dynamic=dynamic,
                                   custom_objects=custom_objects, route=route, model_class=model_class,
                                   framework=framework, task=task, preprocessing=preprocessing, options=options,
                                   tolerances=tolerances, budget=budget, calib=calib, val=val,
                                   val_labels=val_labels)
    forced = parse_forced_routes(route)
    dyn = [d for d in (dynamic.split(",") if isinstance(dynamic, str) else dynamic) if str(d).strip()]
    # bad names are refused before the (possibly slow) model load
    fixed_pairs = [(Format.parse(str(f)), Precision.parse(str(p))) for f, p in variants] if variants is not None \
        else None
    targets: list[Format] = _as_list(to, Format)
    asked: list[Precision] | None = None if precision is None else _as_list(precision, Precision)
    out = Path(out)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise EdgeSDKError(f"{out} already exists: choose another --out or pass --overwrite")
    report = Reporter(quiet=quiet)
    options = options or ConvertOptions()
    check_options(options, [*registered().values(), *all_route_converters()])  # a typo'd key fails here
    tols = {**DEFAULT_TOLERANCES, **(tolerances or {})}

    with report.step("loading source model"):
        src = load_source(source, input_shape=input_shape if input_shape else None, model_class=model_class,
                          framework=framework, input_dtypes=input_dtypes, custom_objects=custom_objects,
                          dynamic=dyn)
    try:
        if fixed_pairs is not None:
            pairs = fixed_pairs
        else:
            own = getattr(src, "precision", None)  # an existing .tflite / IR is bundled in its own precision
            precisions = asked if asked is not None else [own or Precision.FP32]
            if Format.ONNX in targets and ort and Format.ORT not in targets:
                targets.insert(targets.index(Format.ONNX) + 1, Format.ORT)
            pairs = [(f, p) for f in targets for p in precisions]
        plan, unsupported = [], []
        for fmt, p in pairs:
            try:
                routes, skipped = candidate_routes(src, fmt, forced)
                routes = routes_with_precision(src, fmt, p, routes)
            except UnsupportedConversionError as exc:
                if not skip_unsupported:
                    raise
                unsupported.append(ArtifactResult(fmt.value, p.value, "unsupported", reason=str(exc)))
                continue
            plan.append((fmt, p, (routes, skipped)))
        if not plan:
            raise UnsupportedConversionError("none of the requested variants can be produced from a "
                                             f"{src.framework.value} source: " + _summary(unsupported))
        if calib is None and any(needs_calibration(converter_of(src, r, f), p) for f, p, (routes, _) in plan
                                 for r in routes):
            raise CalibrationError("int8 needs calibration data: pass --calib FILE.npy (or an image folder "
                                   "with preprocessing flags), 100-500 representative inputs")
        with report.step("loading calibration / validation data"):
            calib_set = val_set = None
            if calib is not None:
                calib_set = load_samples(calib, input_shapes=src.input_shapes, input_names=src.input_names,
                                         preprocessing=preprocessing, what="calibration")
                calib_set.check(src.input_shapes, "calibration")
            if val is not None:
                val_set = load_samples(val, input_shapes=src.input_shapes, input_names=src.input_names,
                                       preprocessing=preprocessing, what="validation")
                val_set.check(src.input_shapes, "validation")
            fixed = src.input_shapes[0][0] if src.input_shapes and src.input_shapes[0] else 1
            if fixed > 1:  # a model with a fixed batch size: each call takes that many rows
                calib_set = calib_set.with_batch(fixed) if calib_set is not None else None
                val_set = val_set.with_batch(fixed) if val_set is not None else None
            calib_set, val_set, val_origin = _split(calib_set, val_set, src.input_shapes,
                                                    list(getattr(src, "input_dtypes", [])) or None)
            val_y = _load_labels_array(val_labels, len(val_set)) if val_labels is not None else None
            label_names = _load_label_names(labels)
        with report.step(f"running the source model on {len(val_set)} validation inputs"):
            ref = reference_outputs(src.predict, val_set)
        the_task = Task.parse(str(task)) if task else (
            Task.CLASSIFICATION if label_names or (len(ref) == 1 and ref[0].ndim == 2 and ref[0].shape[1] > 1)
            else Task.OTHER)
        classifier = the_task is Task.CLASSIFICATION
        return _build(src, plan, calib_set, val_set, val_origin, ref, val_y, label_names, classifier, the_task,
                      out, name, version, preprocessing, options, tols, keep_failed, overwrite, report, unsupported,
                      budget, identity, conversion)
    finally:
        src.close()


def _build(src, plan, calib_set, val_set, val_origin, ref, val_y, label_names, classifier, the_task, out, name,
           version, preprocessing, options, tols, keep_failed, overwrite, report, unsupported,
           budget: AccuracyBudget | None = None, identity: dict[str, Any] | None = None,
           conversion: dict[str, Any] | None = None) -> Bundle:
    results: list[ArtifactResult] = list(unsupported)
    artifacts: list[Artifact] = []
    workdir = Path(tempfile.mkdtemp(prefix="edge_sdk_work_"))
    # the model card (labels, preprocessing, name ...) the Core ML converters and the TFLite metadata describe
    options = with_card(options, name=name or (src.path.stem if src.path else "model"), version=str(version),
                        task=the_task.value, labels=label_names, preprocessing=preprocessing)
    ctx = ConversionContext(src, workdir, calibration=calib_set, options=options)
    try:
        ladders: dict[int, BudgetLadder] = {}

        def ladder_for(c: ConversionContext) -> BudgetLadder | None:
            if budget is None:
                return None
            if id(c) not in ladders:
                ladders[id(c)] = BudgetLadder(c, budget, {f"{f.value}/{p.value}" for f, p, _ in plan}, report)
            return ladders[id(c)]

        judge = Judge(src, val_set, ref, val_y, classifier, tols, report)
        with atomic_bundle_dir(out, overwrite=overwrite) as bdir:
            for fmt, p, (routes, skipped) in plan:
                for res, d in produce_artifact(ctx, fmt, p, routes, skipped, judge, ladder_for, report):
                    results.append(res)
                    if d is not None and (res.status != "failed" or keep_failed):
                        artifacts.append(place(d, res, bdir))
                        annotate_tflite(bdir, artifacts[-1], card_of(options), res)  # sha256 redone after
            if not artifacts:
                err = ValidationError("no artifact passed: nothing was written; " + _summary(results),
                                      [f"{r.key}: {r.reason}" for r in results])
                err.results = results  # type: ignore[attr-defined]
                raise err
            smoke_extra, smoke_files = _write_smoke(bdir, val_set, ref, tols, val_origin)
            for art in artifacts:  # listed with every artifact so Bundle.verify and the signature cover them
                art.files.extend(dict(f) for f in smoke_files)
            manifest = Manifest(
                name=name or (src.path.stem if src.path else "model"),
                version=str(version),
                source=src.describe(),
                task=the_task.value,
                preprocessing=preprocessing.to_dict() if preprocessing else {},
                labels=label_names,
                baseline=compute_baseline(val_set.arrays[0], src.layout, ref[0], classifier=classifier),
                artifacts=artifacts,
                inputs=[TensorSpec(n, list(s), dt, layout=src.layout or None)
                        for n, s, dt in zip(src.input_names, src.input_shapes, _dtypes_of(src), strict=True)],
                outputs=[TensorSpec(n, [int(d) for d in (1, *r.shape[1:])], "float32")
                         for n, r in zip(src.output_names, ref, strict=False)],
                extra={"validation_data": val_origin,
                       "calibration_samples": len(calib_set) if calib_set is not None else 0,
                       "smoke_test": smoke_extra,
                       **({"conversion": conversion} if conversion else {})},
                **(identity or {}),
            )
            bundle = Bundle(bdir, manifest)
            validate_manifest(manifest.to_dict())
            bundle.save()
    finally:
        ctx.close()
        shutil.rmtree(workdir, ignore_errors=True)
    bundle = Bundle.load(out)
    report.table(results, label_names is not None or val_y is not None)
    failed = [r for r in results if r.status in ("failed", "error")]
    if failed:
        err = ValidationError(f"{len(failed)} of {len(results)} artifact(s) failed: " + _summary(failed)
                              + (" (kept, marked passed: false)" if keep_failed else
                                 " — left out of the bundle; use --keep-failed to keep them"),
                              [f"{r.key}: {r.reason}" for r in failed])
        err.bundle = bundle  # type: ignore[attr-defined]
        err.results = results  # type: ignore[attr-defined]
        raise err
    bundle.results = results  # type: ignore[attr-defined]
    return bundle


def _described(data: Any) -> dict[str, Any] | None:
    """Where calibration / validation data came from (a path is kept; arrays are only counted)."""
    if data is None:
        return None
    if isinstance(data, (str, Path)):
        return {"path": str(data)}
    if isinstance(data, dict):  # one array per input name: the samples are the rows
        first = next(iter(data.values()), None)
        return {"kind": "dict", "samples": len(first) if hasattr(first, "__len__") else None}
    return {"kind": type(data).__name__, "samples": len(data) if hasattr(data, "__len__") else None}


def conversion_record(**opts: Any) -> dict[str, Any]:
    """The options of one ``convert`` call as JSON (``manifest.extra.conversion``), so that a retraining pipeline
    (edge_sdk.pipeline) can replay them for the next version: the same targets, precisions, shapes, preprocessing,
    converter options, tolerances and accuracy budget. Data is recorded by origin only (a path, or a count)."""
    from dataclasses import asdict

    def listed(v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        return [str(getattr(x, "value", x)) for x in v]

    def dims(v: Any) -> list[int | None]:
        return [None if d is None else int(d) for d in v]

    shape = opts["input_shape"]
    tols = opts["tolerances"]
    record = {
        "to": listed(opts["to"]), "precision": listed(opts["precision"]),
        "variants": [[str(getattr(f, "value", f)), str(getattr(p, "value", p))] for f, p in opts["variants"]]
        if opts["variants"] is not None else None,
        "ort": bool(opts["ort"]), "skip_unsupported": bool(opts["skip_unsupported"]),
        "keep_failed": bool(opts["keep_failed"]),
        "input_shape": {str(k): dims(v) for k, v in shape.items()} if isinstance(shape, Mapping)
        else dims(shape) if shape else None,
        "input_dtypes": ({str(k): str(v) for k, v in opts["input_dtypes"].items()}
                         if isinstance(opts["input_dtypes"], Mapping) else [str(v) for v in opts["input_dtypes"]])
        if opts["input_dtypes"] else None,
        "dynamic": [d.strip() for d in opts["dynamic"].split(",") if d.strip()] if isinstance(opts["dynamic"], str)
        else listed(opts["dynamic"]) or None,
        "custom_objects": listed(opts["custom_objects"]), "route": opts["route"] if isinstance(opts["route"],
                                                                                               (str, dict)) else
        listed(opts["route"]),
        "model_class": opts["model_class"], "framework": opts["framework"],
        "task": str(getattr(opts["task"], "value", opts["task"])) if opts["task"] else None,
        "preprocessing": opts["preprocessing"].to_dict() if opts["preprocessing"] else None,
        "options": asdict(opts["options"]) if opts["options"] else None,
        "tolerances": {str(getattr(p, "value", p)): asdict(t) for p, t in tols.items()} if tols else None,
        "budget": asdict(opts["budget"]) if opts["budget"] else None,
        "calibration": _described(opts["calib"]), "validation": _described(opts["val"]),
        "validation_labels": opts["val_labels"] is not None,
    }
    return json.loads(json.dumps(record, default=str))  # plain JSON (e.g. a ConvertOptions.extra of any values)


def _identity(version_code: int | None, fleets: Sequence[str] | None) -> dict[str, Any]:
    """The Manifest fields ``version_code`` / ``fleets`` (checked; empty when not given)."""
    out: dict[str, Any] = {}
    if version_code is not None:
        if isinstance(version_code, bool) or not isinstance(version_code, int) or version_code < 0:
            raise EdgeSDKError(f"--version-code {version_code!r} must be a whole number >= 0 (higher = newer)")
        out["version_code"] = version_code
    if fleets:
        if isinstance(fleets, str):
            fleets = [fleets]
        try:
            out["fleets"] = sorted({validate_id(str(f), "--fleet") for f in fleets})
        except ValueError as exc:
            raise EdgeSDKError(str(exc)) from None
    return out


def _dtypes_of(src: Any) -> list[str]:
    return list(getattr(src, "input_dtypes", None) or ["float32"] * len(src.input_names))


def _write_smoke(bdir: Path, val_set: SampleSet, ref: list[np.ndarray], tols: dict[Precision, Tolerance],
                 origin: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Validation sample 0 and the source model's outputs for it: the device's smoke test (edge_sdk.smoke)."""
    scale = max((float(np.abs(r).max()) for r in ref if r.size), default=1.0) or 1.0
    limits = {p.value: {"min_cosine": t.min_cosine, "max_rel_error": t.max_rel_error} for p, t in tols.items()}
    b = val_set.batch
    return write_smoke_sample(bdir, [a[:b] for a in val_set.arrays], [r[:b] for r in ref], limits,
                              output_scale=scale, origin=f"validation sample 0 of {origin}")


def _summary(results: list[ArtifactResult]) -> str:
    return "; ".join(f"{r.key}: {r.reason}" for r in results)


def _load_labels_array(value: str | Path | np.ndarray, n: int) -> np.ndarray:
    arr = np.load(value, allow_pickle=False) if isinstance(value, (str, Path)) else np.asarray(value)
    arr = arr.reshape(-1)
    if arr.shape[0] < n:
        raise CalibrationError(f"--val-labels has {arr.shape[0]} labels for {n} validation inputs: give one "
                               "integer class per input")
    return arr[:n].astype(np.int64)


def _load_label_names(value: str | Path | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        p = Path(value)
        if not p.is_file():
            raise CalibrationError(f"labels file {p} does not exist: give a text file with one label per line")
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    return [str(v) for v in value]
